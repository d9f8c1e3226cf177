//! kt-tests: the harness of kt's privileged tests, end-to-end suites, benchmarks and demo.

pub mod harness;
pub mod testbed;
