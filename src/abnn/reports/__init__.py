"""Reports (``report.md`` and figures) of the reproduce pipelines."""
