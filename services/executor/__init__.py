"""The Execute service: applies scheduled commands through mechanism plugins."""
