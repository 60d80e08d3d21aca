"""Reports (``report.md`` and PNG figures) of the reproduce pipelines, one module per pipeline:
:mod:`.table1` (with the figures Tables 1-3 share), :mod:`.video`, :mod:`.studies` (frontier and
substitute study), :mod:`.forensics`, :mod:`.robust_substitute`; shared helpers in :mod:`.common`; figures draw through :func:`abnn.plotting.pyplot`."""
