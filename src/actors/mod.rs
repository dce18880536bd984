//! The ractor actor tree. One file per actor: its message enum, its state, its typed handle.
//! `actors.md` at the repository root describes the tree, every message and the restart policy.

pub mod credential;

pub use credential::{
    CredentialActor, CredentialArgs, CredentialError, CredentialHandle, CredentialMsg,
};
