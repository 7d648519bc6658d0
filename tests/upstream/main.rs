//! Integration tests of the upstream poller against a real mock upstream on 127.0.0.1.

mod support;

mod fetch;
mod poll;
mod schedule;
