"""Helpers for testing applications that send mail with mailoutbox."""
