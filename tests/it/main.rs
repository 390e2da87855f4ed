//! The integration tests, in one test binary (one link of the crate and its
//! dependencies instead of one per file): each module is one area, run
//! alone with `cargo test --test it <module>::`.

mod support;

mod engine_http;
mod engine_sdk;
mod engine_serve;
mod hardening;
mod imageio_api;
mod imageio_clients;
mod imageio_embed;
mod imageio_nbd;
mod nbd_budget;
mod nbd_libnbd;
mod nbd_nbdcopy;
mod nbd_nbdinfo;
mod nbd_qemu_img;
mod nbd_raw;
mod nbd_tls;
mod nbd_uri;
mod serve_backup;
mod serve_coalesce;
mod serve_connections;
mod serve_embedded;
mod serve_imageio_url;
mod serve_phases;
mod serve_readahead;
mod serve_transfer;
