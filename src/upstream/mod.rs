//! Upstreams: polling one API on a schedule, fetching with conditional requests, decoding.

pub mod decode;
