"""Third-party model corpus, HF transformers part: `archs.py`, the registry of decoder architectures (tiny random
configs) with the fusions each should get and the ones the backend finds; `run.py`, one (architecture, dtype)
through eager and the backend.  Used by tests/test_corpus.py and benchmarks/hf_corpus_{table,probe}.py."""
