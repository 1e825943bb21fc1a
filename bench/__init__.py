"""chatproxy's benchmark harness (``make bench``; ``python -m bench --help``). See bench/README.md."""
