//! MCP tools as LLM function definitions. Function names are the namespaced tool names of
//! [`crate::mcp::names`], the same ones `/mcp` gives MCP clients.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::client::ToolDefinition;
pub use crate::mcp::names::ToolRoute;
use crate::mcp::names::namespace;
use crate::store::ServerName;

/// The tools of one chat: definitions for the model and the way back to (server, tool).
#[derive(Debug, Clone, Default)]
pub struct ToolSet {
    definitions: Vec<ToolDefinition>,
    routes: HashMap<String, ToolRoute>,
}

impl ToolSet {
    /// Builds the set from each server's tools, in the order given. A tool listed twice by one
    /// server is offered once.
    pub fn build<'a>(
        servers: impl IntoIterator<Item = (&'a ServerName, &'a [rmcp::model::Tool])>,
    ) -> ToolSet {
        let mut set = ToolSet::default();
        for named in namespace(servers) {
            set.definitions.push(ToolDefinition::function(
                named.name.clone(),
                named.tool.description.as_ref().map(|d| d.to_string()),
                object_schema(&named.tool.input_schema),
            ));
            set.routes.insert(
                named.name,
                ToolRoute {
                    server: named.server.clone(),
                    tool: named.tool.name.to_string(),
                },
            );
        }
        set
    }

    /// What the model is offered.
    pub fn definitions(&self) -> &[ToolDefinition] {
        &self.definitions
    }

    /// The (server, tool) behind a function name.
    pub fn route(&self, function: &str) -> Option<&ToolRoute> {
        self.routes.get(function)
    }

    pub fn len(&self) -> usize {
        self.definitions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.definitions.is_empty()
    }
}

/// The tool's input schema as an object schema: `type: "object"` added when missing,
/// `properties` added when absent (some APIs insist), and a non-object schema (which MCP does
/// not allow) replaced by an empty object schema.
pub fn object_schema(schema: &Map<String, Value>) -> Value {
    match schema.get("type") {
        Some(Value::String(kind)) if kind == "object" => {}
        None => {}
        Some(_) => return json!({ "type": "object", "properties": {} }),
    }
    let mut schema = schema.clone();
    schema.insert("type".into(), Value::String("object".into()));
    schema
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    Value::Object(schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tool(name: &str, schema: Value) -> rmcp::model::Tool {
        let Value::Object(schema) = schema else {
            panic!("schema must be an object")
        };
        rmcp::model::Tool::new(name.to_owned(), "a tool", Arc::new(schema))
    }

    #[test]
    fn tool_set_routes_names_back_and_keeps_schemas() {
        let demo = ServerName::parse("demo").unwrap();
        let demo2 = ServerName::parse("demo2").unwrap();
        let add_schema = json!({
            "type": "object",
            "properties": { "a": { "type": "number" }, "b": { "type": "number" } },
            "required": ["a", "b"],
        });
        let demo_tools = [tool(
            "echo",
            json!({"properties": {"message": {"type": "string"}}}),
        )];
        let demo2_tools = [
            tool("add", add_schema.clone()),
            tool("add", add_schema.clone()),
            tool("whoami", json!({})),
        ];
        let set = ToolSet::build([(&demo, &demo_tools[..]), (&demo2, &demo2_tools[..])]);
        assert_eq!(set.len(), 3, "the duplicate add is offered once");
        let names: Vec<_> = set
            .definitions()
            .iter()
            .map(|d| d.function.name.as_str())
            .collect();
        assert_eq!(names, ["demo__echo", "demo2__add", "demo2__whoami"]);
        assert_eq!(
            set.route("demo2__add"),
            Some(&ToolRoute {
                server: demo2.clone(),
                tool: "add".into()
            })
        );
        assert_eq!(set.route("demo__add"), None);
        let defs = set.definitions();
        assert_eq!(defs[0].kind, "function");
        assert_eq!(defs[0].function.description.as_deref(), Some("a tool"));
        assert_eq!(
            defs[0].function.parameters,
            json!({"type": "object", "properties": {"message": {"type": "string"}}})
        );
        assert_eq!(defs[1].function.parameters, add_schema);
        assert_eq!(
            defs[2].function.parameters,
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn non_object_schemas_become_empty_object_schemas() {
        let Value::Object(schema) = json!({"type": "string"}) else {
            unreachable!()
        };
        assert_eq!(
            object_schema(&schema),
            json!({"type": "object", "properties": {}})
        );
    }
}
