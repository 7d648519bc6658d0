//! Integration tests of everything that starts something: the real application over real
//! sockets, configured from TOML as users configure it, a mock upstream that changes, real SSE
//! clients; the `patchwire` binary itself (`cli`), the load tool against the app (`load`), the
//! simulator's HTTP server (`sim_http`), configuration files as users write them
//! (`config_load`), the fetcher and the poller on their own (`upstream`), and the layers of
//! `src/` (`layering`). The data-driven tests of the diff engine are `tests/data`.

mod support;

mod backpressure;
mod brokers;
mod catchup;
mod cli;
mod cluster;
mod cluster_lease;
mod cluster_reload;
mod cluster_store;
mod conditional;
mod config_load;
mod connections;
mod console;
mod contracts;
mod failures;
mod layering;
mod load;
mod outbox;
mod poll_now;
mod proxy;
mod push;
mod reload;
mod replay;
mod resume;
mod secrets;
mod shutdown;
mod sim_http;
mod streaming;
mod transports;
mod upstream;
mod views;
mod webhook;
mod webhook_crash;
mod webhook_views;
mod websocket;
mod websocket_clients;
mod wire;
