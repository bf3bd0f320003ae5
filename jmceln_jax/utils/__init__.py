"""Files: path helpers, atomic writes and the metric writers."""
