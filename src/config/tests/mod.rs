//! Sections read from files through the loader and the whole validation, as a user writes them.

mod proxy;
mod server;
mod webhooks;
