"""Widgets of the keyboard app."""
