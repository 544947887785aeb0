"""The benchmarks: cached READ against online READ, full fine-tuning and the baselines, on the same examples.

    read-cache bench --model ./t5-small-random --task sst2 --data-dir ../shared/glue --limit 2000 --out bench/

`run` drives them (one subprocess per method) and writes the reports; `methods` holds the methods, named
in its `REGISTRY`; `reader` measures the store formats' read rate; `common` meters a call.
"""
