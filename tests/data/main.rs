//! Data-driven tests: the diff engine against published suites and real recorded feeds under
//! `../shared/data` (read through `patchwire-test-data`: missing data skips with a message,
//! except under `CI=true`). Nothing here starts the application; that is `tests/it`.

mod support;

mod diff_conformance;
mod diff_sequences;
mod real_feeds;
mod views;
