//! The commands: each one calls the libraries and returns what to print.

pub mod probe;
pub mod map;
pub mod run;
pub mod compare;
pub mod main_job;
