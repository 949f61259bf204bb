"""Draw the drain rates of ``drain.py --json FILE`` as an SVG bar chart.

Usage: python benchmarks/plot.py RESULTS.json OUTPUT.svg

One group of bars per server, one bar per contender, on a logarithmic
scale (the rates span three orders of magnitude).  Plain SVG, no plotting
library needed.
"""
from __future__ import annotations

import json
import math
import sys
from html import escape

COLOURS = ["#9e9e9e", "#5c6bc0", "#66bb6a", "#2e7d32", "#1b5e20", "#0d3b12"]


def svg(results: list[list]) -> str:
    rates = [(s, n, v) for s, n, v in results if s != "big queue"]
    servers = list(dict.fromkeys(s for s, _, _ in rates))
    names = list(dict.fromkeys(n for _, n, _ in rates))
    width, height, left, top, bottom = 760, 360, 60, 30, 80
    group = (width - left - 20) / max(1, len(servers))
    bar = group * 0.8 / max(1, len(names))
    top_value = max(v for _, _, v in rates)
    decades = max(1, math.ceil(math.log10(top_value)))
    plot_h = height - top - bottom

    def y(value: float) -> float:
        return top + plot_h * (1 - math.log10(max(value, 1)) / decades)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        ' font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13">Drain rate, messages per second'
        " (log scale; higher is better)</text>",
    ]
    for d in range(decades + 1):
        yy = y(10**d)
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{yy:.1f}" y2="{yy:.1f}"'
                   ' stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">'
                   f"{10**d:g}</text>")
    for i, server in enumerate(servers):
        x0 = left + i * group + group * 0.1
        for j, name in enumerate(names):
            value = next((v for s, n, v in rates if s == server and n == name), None)
            if value is None:
                continue
            x = x0 + j * bar
            out.append(
                f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar * 0.9:.1f}"'
                f' height="{top + plot_h - y(value):.1f}"'
                f' fill="{COLOURS[j % len(COLOURS)]}"/>'
            )
            out.append(f'<text x="{x + bar * 0.45:.1f}" y="{y(value) - 3:.1f}"'
                       f' text-anchor="middle" font-size="8">{value:.0f}</text>')
        out.append(f'<text x="{x0 + group * 0.4:.1f}" y="{top + plot_h + 16}"'
                   f' text-anchor="middle">{escape(server)}</text>')
    for j, name in enumerate(names):
        lx = left + (j % 3) * 230
        ly = height - 36 + (j // 3) * 16
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10"'
                   f' fill="{COLOURS[j % len(COLOURS)]}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    source, target = (argv if argv is not None else sys.argv[1:])[:2]
    with open(source) as f:
        results = json.load(f)
    with open(target, "w") as f:
        f.write(svg(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
