//! MCP client sessions over stdio, child-process hygiene, and the bundled demo server.
