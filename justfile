# herald's everyday commands. `just --list` shows them.

# Every test: unit, property, crash and end-to-end (the README's test command).
test:
    cargo test --workspace

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Every benchmark in release mode; each figure beside its limit measured in the same run.
bench:
    cargo bench --bench core -- --json docs/benchmarks.json

# Format the code.
fmt:
    cargo fmt --all
