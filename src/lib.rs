//! cutover: deploys new releases of an app to a fleet of servers with zero downtime, and proves
//! it by counting every request served while it ran.
//!
//! The modules follow the concepts of the design: the config says what the fleet is; a
//! [`transport`] reaches a host; [`release`] stages builds on hosts; [`instance`] starts, checks
//! and stops processes; [`balancer`] is the deployer's view of the load balancer and [`proxy`]
//! the built-in one; [`batch`] turns a rolling spec into batches (pure); [`deploy`] carries a
//! strategy out step by step.

pub mod accept;
pub mod analysis;
pub mod atomic_file;
pub mod balancer;
pub mod batch;
pub mod bounded;
pub mod cli;
pub mod config;
mod control;
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod fleet_control;
pub mod fleet_lock;
pub mod hooks;
pub mod init;
pub mod instance;
pub mod inventory;
pub mod journal;
pub mod load;
pub mod probe;
pub mod progress;
pub mod proxy;
pub mod readmit;
pub mod release;
pub mod report;
pub mod sample_app;
pub mod server;
pub mod settle;
pub mod source;
pub mod strategy;
pub mod transport;
pub mod verify;
