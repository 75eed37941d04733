//! `text`: the human-readable form of the library's reports (`Display`), as the CLI shows them
//! without `--json`. One place for the wording, so every front end says the same thing; the
//! library itself still prints nothing.
mod attach;
mod build;
mod initrd;
mod versions;

use std::fmt::Display;

pub use attach::BootSpecText;
/// Guest-derived text (a console's fault messages) escaped before it is shown.
pub use gpu_passthrough_guest_contract::printable::escape_control;
pub use initrd::{InitrdText, ListingText};
pub use versions::ReleaseTable;

/// An optional value, or `-` in its place.
fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}
