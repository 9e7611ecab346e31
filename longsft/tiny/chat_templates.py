"""Jinja chat templates of the tiny chat tokenizers (tools/make_tiny.py `make_chat_template_tokenizer`).

Written for this project from the models' published prompt formats (model cards and their function-calling
guides), not copied from the models' files; they render the same text as the real ones for the conversations
the tests use (plain turns, system prompts, tools, tool calls and tool results), with the same structure where it
matters to training: which turns a template rewrites, where a reply ends, which roles it accepts.

- GLM_EDGE: glm-edge chat (`glm`): `<|system|>\\n...<|user|>\\n...<|assistant|>\\n...`, no end-of-turn token (the
  next role token ends a reply), tool calls `<|assistant|>{name}\\n{arguments}`, results `<|observation|>\\n...`,
  tools as a `# 可用工具` system block, generation prompt `<|assistant|>\\n`.
- GLM4_0414: GLM-4-0414 (`glm4`): the same after `[gMASK]<sop>`, generation prompt `<|assistant|>`.
- QWEN2: Qwen2.5-Instruct: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, the default system prompt, tools in the
  system message inside `<tools></tools>`, calls as `<tool_call>` JSON, results `<tool_response>` in a user turn.
- QWEN3: Qwen3: Qwen2.5's layout without the default system prompt; a reply after the last user message is
  written `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (the last one always), earlier replies lose their
  reasoning: the template rewrites earlier turns, so it is not prefix-stable.
- MISTRAL: Mistral-7B-Instruct-v0.3: `<s>[INST] {user}[/INST] {reply}</s>`, the system prompt and
  `[AVAILABLE_TOOLS]` before the last user message only (not prefix-stable with a system prompt), `[TOOL_CALLS]`,
  `[TOOL_RESULTS]`, 9-character call ids, user/assistant must alternate.
- LLAMA31: Llama-3.1-Instruct with custom tools: the `Cutting Knowledge Date` system header (`Environment:
  ipython` with tools), tools in the first user message, a call as `{"name": ..., "parameters": ...}`, results in
  the `ipython` role; one call per message.
- QWEN2_MARKED: QWEN2 with `{% generation %}` around what the assistant writes (content, calls, `<|im_end|>`).
"""

_GLM_TOOLS = (
    "{%- if tools -%}"
    "{{- '<|system|>\\n# 可用工具' -}}"
    "{%- for tool in tools -%}"
    "{%- set f = tool.function if tool.function is defined else tool -%}"
    "{{- '\\n\\n## ' + f.name + '\\n\\n' + (f | tojson(indent=4)) + '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
)
_GLM_TURNS = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' or m.role == 'user' -%}"
    "{{- '<|' + m.role + '|>\\n' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.content or not m.tool_calls -%}"
    "{{- '<|assistant|>' + (m.metadata or '') + '\\n' + m.content -}}"
    "{%- endif -%}"
    "{%- for call in m.tool_calls or [] -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    "{{- '<|assistant|>' + f.name + '\\n' + (f.arguments if f.arguments is string else f.arguments | tojson) -}}"
    "{%- endfor -%}"
    "{%- elif m.role == 'tool' or m.role == 'observation' -%}"
    "{{- '<|observation|>\\n' + m.content -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + m.role) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
GLM_EDGE = _GLM_TOOLS + _GLM_TURNS + "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
GLM4_0414 = ("{{- '[gMASK]<sop>' -}}" + _GLM_TOOLS + _GLM_TURNS
             + "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")

_QWEN_TOOLS_TEXT = (
    "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>"
)
_QWEN_TOOLS_END = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call>"
)


def _qwen_system(default: str) -> str:
    """The system turn: the first message if it is a system one (else `default`, none when empty and there are no
    tools), then the tools block; `sys.skip` is 1 when the first message was the system one."""
    return (
        "{%- set sys = namespace(text=" + repr(default) + ", skip=0) -%}"
        "{%- if messages and messages[0].role == 'system' -%}"
        "{%- set sys.text = messages[0].content -%}{%- set sys.skip = 1 -%}"
        "{%- endif -%}"
        "{%- if tools or sys.skip or sys.text -%}"
        "{{- '<|im_start|>system\\n' + sys.text -}}"
        "{%- if tools -%}"
        "{{- '" + _QWEN_TOOLS_TEXT + "' -}}"
        "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        "{{- '" + _QWEN_TOOLS_END + "' -}}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endif -%}"
    )


def _qwen_calls(newline_first: str) -> str:
    """The tool calls after the reply text, each as <tool_call> JSON; `newline_first`: when the first call gets a
    newline before it (Qwen2.5: always, Qwen3: after a reply text)."""
    return (
        "{%- for call in m.tool_calls or [] -%}"
        "{%- set f = call.function if call.function is defined else call -%}"
        "{%- if not loop.first or " + newline_first + " -%}{{- '\\n' -}}{%- endif -%}"
        "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' -}}"
        "{{- (f.arguments if f.arguments is string else f.arguments | tojson) + '}\\n</tool_call>' -}}"
        "{%- endfor -%}"
    )


_QWEN_RESULTS = (  # consecutive tool results share one user turn
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + m.role) -}}"
    "{%- endif -%}"
)


def _qwen2(marked: bool) -> str:
    gen, end = ("{%- generation -%}", "{%- endgeneration -%}") if marked else ("", "")
    return (
        _qwen_system("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        + "{%- for m in messages[sys.skip:] -%}"
        "{%- if m.role == 'user' or m.role == 'system' -%}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
        "{%- elif m.role == 'assistant' -%}"
        "{%- set text = m.content or '' -%}"
        "{{- '<|im_start|>assistant' -}}"
        "{%- if text or not m.tool_calls -%}{{- '\\n' -}}{%- endif -%}"
        + gen + "{{- text -}}" + _qwen_calls("true") + "{{- '<|im_end|>' -}}" + end + "{{- '\\n' -}}"
        + _QWEN_RESULTS
        + "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


QWEN2 = _qwen2(False)
QWEN2_MARKED = _qwen2(True)

QWEN3 = (
    _qwen_system("")
    + "{%- set q = namespace(last=-1) -%}"
    "{%- for m in messages[sys.skip:] -%}"
    "{%- if m.role == 'user' -%}{%- set q.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages[sys.skip:] -%}"
    "{%- if m.role == 'user' or m.role == 'system' -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set text = m.content if m.content is string else '' -%}"
    "{%- set thought = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if m.reasoning_content is not string and '</think>' in text -%}"
    "{%- set thought = text.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > q.last and (loop.last or thought) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + text -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + text -}}"
    "{%- endif -%}"
    + _qwen_calls("text") + "{{- '<|im_end|>\\n' -}}"
    + _QWEN_RESULTS
    + "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

MISTRAL = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- set s = namespace(last_user=-1, n=0) -%}"
    "{%- for m in turns -%}"
    "{%- if m.role == 'user' -%}{%- set s.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) -%}"
    "{%- if (m.role == 'user') != (s.n % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set s.n = s.n + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if m.role == 'user' -%}"
    "{%- if tools and loop.index0 == s.last_user -%}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}"
    "{%- endif -%}"
    "{%- if system and loop.index0 == s.last_user -%}"
    "{{- '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m.content + '[/INST]' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}"
    "{{- '[TOOL_CALLS] [' -}}"
    "{%- for call in m.tool_calls -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    "{%- if call.id is not defined or call.id | length != 9 -%}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') -}}"
    "{%- endif -%}"
    "{{- {'name': f.name, 'arguments': f.arguments, 'id': call.id} | tojson -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ']' + eos_token -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- ' ' + m.content | trim + eos_token -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + m.content + ', \"call_id\": \"' + m.tool_call_id + '\"}[/TOOL_RESULTS]' -}}"
    "{%- else -%}"
    "{{- raise_exception('Only user, assistant and tool roles are supported, with the exception of an initial "
    "optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

LLAMA31 = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- set date = date_string if date_string is defined else '26 Jul 2024' -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date + '\\n\\n' + system + '<|eot_id|>' -}}"
    "{%- set t = namespace(pending=tools) -%}"
    "{%- for m in turns -%}"
    "{%- if m.role == 'user' and t.pending -%}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON "
    "for a function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables."
    "\\n\\n' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
    "{{- m.content + '<|eot_id|>' -}}"
    "{%- set t.pending = none -%}"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}"
    "{%- if m.tool_calls | length != 1 -%}"
    "{{- raise_exception('This model only supports single tool-calls at once!') -}}"
    "{%- endif -%}"
    "{%- set f = m.tool_calls[0].function if m.tool_calls[0].function is defined else m.tool_calls[0] -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + f.name + '\", \"parameters\": ' -}}"
    "{{- (f.arguments | tojson) + '}<|eot_id|>' -}}"
    "{%- elif m.role == 'tool' or m.role == 'ipython' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' -}}"
    "{{- (m.content if m.content is string else m.content | tojson) + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
