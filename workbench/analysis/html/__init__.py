"""The HTML report: the view, the standalone page, its parts and formatting."""
