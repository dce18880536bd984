//! `/v1/chat`: an OpenAI-compatible chat-completions client and the tool-call loop that offers
//! a user's MCP tools to the model and runs its calls through the pool.
//!
//! - [`client`]: `POST {base_url}/chat/completions`, tools, parallel tool calls, streaming.
//! - [`tools`]: MCP tools as function definitions with unique, API-valid names.
//! - [`chat`]: the loop, its trace and its streamed events.

pub mod chat;
pub mod client;
pub mod tools;

pub use chat::{
    ChatError, ChatEvent, ChatOutcome, ChatRequest, HistoryMessage, HistoryRole, SkippedServer,
    ToolCallTrace, run_chat,
};
pub use client::{Completion, CompletionRequest, LlmClient, LlmError, Message, ToolCall, Usage};
pub use tools::{ToolRoute, ToolSet};
