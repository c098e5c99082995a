"""vLLM integration: `compilation_config={"backend": "kunlun"}` in modes 2 and 3.

    compat.py      the vLLM versions and hooks this relies on; a clear error otherwise
    options.py     this backend's options as vLLM's config carries them
    compiler.py    `KunlunCompilerInterface`: vLLM's compiler interface (mode 3, piecewise)
    warm_start.py  the pass pipeline's output stored by a cold start, loaded by the next one
    graph_key.py   what a stored graph is keyed by (graph, inputs, options, code and versions)
    graph_store.py the stored graphs on disk, in vLLM's cache directory (checksummed entries)
    reports.py     each worker's compile report, per rank, and reading them back (`select`, `format_reports`)
    fusion_pass.py the fusion passes as a post-grad pass inside vLLM's own inductor pipeline
    plugin.py      the `vllm.general_plugins` entry point that wires it all in

Nothing here imports vLLM at import time of `kunlun_compile`; the plugin is
loaded by vLLM itself, in every vLLM process.
"""
