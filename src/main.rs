//! The `cutover` binary: a thin shell over the library; see `cli` for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    cutover::cli::main()
}
