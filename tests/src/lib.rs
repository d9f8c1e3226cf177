//! kt-tests: the harness of kt's privileged tests, end-to-end suites, benchmarks and demo.
//! The simulated cluster they run on is the `kt-testbed` crate.

pub mod harness;
