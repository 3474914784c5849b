"""What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` mean: validation (400s), the tools
the template renders, the grammar that forces "required" and named calls, and the parser that reads them."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from ember.sampling_params import StructuredOutputsParams
from ember.server.errors import APIError
from ember.server.tool_parsers import create_tool_parser
from ember.server.tool_parsers.abstract import ToolParser
from ember.server.tool_parsers.forced import NamedFunctionParser, RequiredFunctionsParser

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolRequest:
    """A validated tool setup.

    choice: "none", "auto", "required" or "named". template_tools: what the chat template renders
    (None: no tool section). function_name: the named function. structured_outputs: the grammar of a
    forced choice. max_tool_calls: 1 when parallel_tool_calls is false, else None.
    """

    choice: str
    template_tools: list[dict] | None = None
    function_name: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    max_tool_calls: int | None = None

    def create_parser(self, auto_parser_name: str, tokenizer: Any = None) -> ToolParser | None:
        """The parser of this choice: None for "none", the forced formats, or `auto_parser_name`'s."""
        if self.choice == "named":
            return NamedFunctionParser(self.function_name, tokenizer)
        if self.choice == "required":
            return RequiredFunctionsParser(tokenizer)
        if self.choice == "auto":
            return create_tool_parser(auto_parser_name, tokenizer)
        return None

    @property
    def finishes_with_tool_calls(self) -> bool:
        """Whether calls turn finish_reason "stop" into "tool_calls" (as vLLM: not for a named function,
        where OpenAI also answers "stop")."""
        return self.choice in ("auto", "required")


def prepare_tools(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolRequest:
    """Validate a request's tool fields and say what they ask for.

    Raises:
        APIError: 400 for a malformed tool, duplicate names, an unknown tool_choice, "required" or a
            named function without tools, or a named function that is not among the tools.
    """
    tools = tools or None
    functions = _check_tools(tools) if tools else {}
    choice, name = _check_tool_choice(tool_choice, tools is not None)
    if choice in ("required", "named") and not tools:
        raise APIError(f"tool_choice {choice!r} requires tools", 400, "tool_choice")
    if choice == "named" and name not in functions:
        raise APIError(f"tool_choice names function {name!r}, which is not among the tools", 400, "tool_choice")
    single = 1 if parallel_tool_calls is False else None
    if choice == "none":
        return ToolRequest("none")
    structured = None
    if choice == "named":
        schema = copy.deepcopy(functions[name].get("parameters") or _EMPTY_PARAMETERS)
        structured = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    elif choice == "required":
        structured = StructuredOutputsParams(json=required_calls_schema(list(functions.values()), single),
                                             disable_any_whitespace=True)
    return ToolRequest(choice, tools, name, structured, single)


def required_calls_schema(functions: list[dict], max_items: int | None) -> dict:
    """vLLM's schema for tool_choice "required": a non-empty array of `{"name", "parameters"}` objects,
    each the name of one tool with that tool's parameters. `$defs` of all tools are hoisted to the top
    (their `$ref`s point at the root); two tools defining one name differently is a 400."""
    defs: dict[str, Any] = {}
    variants = []
    for function in functions:
        parameters = copy.deepcopy(function.get("parameters") or _EMPTY_PARAMETERS)
        for def_name, definition in parameters.pop("$defs", {}).items():
            if def_name in defs and defs[def_name] != definition:
                raise APIError(f"tools define $defs {def_name!r} differently", 400, "tools")
            defs[def_name] = definition
        variants.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                          "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if max_items is not None:
        schema["maxItems"] = max_items
    if defs:
        schema["$defs"] = defs
    return schema


def template_tool_calls(tool_calls: Any) -> list[dict]:
    """An assistant message's `tool_calls` as chat templates expect them: JSON-text arguments become
    objects (vLLM does the same; templates such as Llama 3's iterate over them).

    Raises:
        APIError: 400 when a call has no function name.
    """
    if not isinstance(tool_calls, list):
        raise APIError("tool_calls must be a list", 400, "messages")
    out = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError("each tool call needs function.name", 400, "messages")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass  # not JSON: the template gets the text as it is
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def _check_tools(tools: list[dict]) -> dict[str, dict]:
    """name -> function definition of each valid tool."""
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise APIError(f"{where}.type must be 'function'", 400, "tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise APIError(f"{where}.function must be an object", 400, "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise APIError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", 400, "tools")
        if name in functions:
            raise APIError(f"two tools are named {name!r}", 400, "tools")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise APIError(f"{where}.function.description must be a string", 400, "tools")
        _check_parameters(function.get("parameters"), where)
        functions[name] = function
    return functions


def _check_parameters(parameters: Any, where: str) -> None:
    """The parameters must be a JSON schema of an object (OpenAI's rule); deeper errors surface when a
    forced choice compiles the schema."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise APIError(f"{where}.function.parameters must be a JSON schema object", 400, "tools")
    if parameters.get("type", "object") != "object":
        raise APIError(f"{where}.function.parameters must describe an object", 400, "tools")
    if not isinstance(parameters.get("properties", {}), dict):
        raise APIError(f"{where}.function.parameters.properties must be an object", 400, "tools")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise APIError(f"{where}.function.parameters.required must be a list of names", 400, "tools")


def _check_tool_choice(tool_choice: Any, has_tools: bool) -> tuple[str, str | None]:
    """(choice, function name) of a tool_choice value; None defaults as OpenAI does."""
    if tool_choice is None:
        return ("auto" if has_tools else "none"), None
    if tool_choice in ("none", "auto", "required"):
        return ("none" if not has_tools and tool_choice == "auto" else tool_choice), None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "named", function["name"]
    raise APIError("tool_choice must be 'none', 'auto', 'required' or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", 400, "tool_choice")
