# Entry points; each calls the project's scripts (run as root: XDP, bpffs, namespaces).
.PHONY: test demo bench bench-run

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

# Set up the peers, run every benchmark (bounded: about 10 minutes on 2 cores), then write
# docs/performance.md and docs/performance-pps.png from bench/out/*.json.
bench:
	bash bench/setup.sh
	$(MAKE) bench-run

bench-run:
	.venv/bin/python bench/perpacket.py
	.venv/bin/python bench/e2e.py
	.venv/bin/python bench/controlplane.py
	.venv/bin/python bench/footprint.py
	.venv/bin/python bench/scale.py
	.venv/bin/python bench/convergence.py
	.venv/bin/python bench/report.py
