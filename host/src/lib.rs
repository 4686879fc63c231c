//! Host side of SERE: the trainer and the `sere` command (work in progress;
//! see the project's issues).
