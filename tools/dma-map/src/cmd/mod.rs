//! The commands: each one calls the libraries and returns what to print.

pub mod compare;
pub mod main_job;
pub mod map;
pub mod probe;
pub mod run;
