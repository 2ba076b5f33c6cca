# herald's everyday commands. `just --list` shows them.

# Run herald with its embedded defaults (data in ./herald-data, API on 127.0.0.1:8080).
run:
    cargo run --release -- serve

# Every test: unit, property, crash and end-to-end (the README's test command; it installs the
# programs the tests drive, Chromium, chromedriver and nats-server, when they are missing).
test:
    scripts/test

# schemathesis against a live server and its /openapi.json (needs python3).
schema:
    .ci/schemathesis.sh

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Every benchmark in release mode, each figure beside its limit measured in the same run; then one
# table of them all in docs/BENCHMARKS.md and docs/benchmarks.json.
bench:
    mkdir -p target/bench
    cargo bench --bench core -- --json target/bench/core.json
    cargo bench --bench delivery -- --json target/bench/delivery.json
    cargo bench --bench http -- --json target/bench/http.json
    cargo bench --bench footprint -- --json target/bench/footprint.json
    cargo bench --bench retention -- --json target/bench/retention.json
    cargo bench --bench recover -- --json target/bench/recover.json
    cargo bench --bench audit -- --json target/bench/audit.json
    cargo bench --bench cluster -- --json target/bench/cluster.json
    cargo bench --bench report -- target/bench docs/BENCHMARKS.md docs/benchmarks.json

# Format the code.
fmt:
    cargo fmt --all
