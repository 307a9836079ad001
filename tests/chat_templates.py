"""Each family's chat template, written from the Jinja templates the instruct models ship (tokenizer_config.json /
chat_template.jinja), cut down where noted (tools, images and dates left out) but keeping what decides the loss mask:
the turn markers, what is trimmed, where the system prompt goes, the end-of-turn token, what
`add_generation_prompt` adds, and what each template does to earlier turns (Qwen3's think blocks, Mistral's system
prompt on the last user turn, Phi-3's trailing eos).

`eot` is what must close each assistant span in the mask (the end-of-turn the model has to learn to emit)."""

from __future__ import annotations

# Llama-3.1/3.2-Instruct: a system header always (knowledge/today dates), contents trimmed, <|eot_id|> per turn.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct: ChatML with a default system prompt (tool calls left out).
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 (dense and MoE ship the same one): ChatML; an assistant turn after the last user query gets a
# <think> block (empty if none), earlier ones lose theirs; enable_thinking=false pre-fills an empty block.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral-7B-Instruct-v0.3 / Mixtral-8x7B-Instruct: [INST] ... [/INST] answer</s>; the system prompt goes into
# the LAST user turn (so earlier turns render differently once a later one is added).
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

# Gemma-2-it: no system role (the template raises), roles user/model, contents trimmed, <end_of_turn>.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma-3-it (text): the system prompt is folded into the first user turn (images left out).
GEMMA3 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

# Phi-3-mini-4k-instruct: <|user|>\n...<|end|>\n; without add_generation_prompt the template ends with eos_token
# (so a prefix ending after an assistant turn is not a prefix of the longer conversation).
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-4: <|im_start|>role<|im_sep|>content<|im_end|> (same architecture class as Phi-3).
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# SmolLM2-Instruct: ChatML with a default system prompt.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# SmolLM3 (cut down: metadata system block, /think vs /no_think, {% generation %} markers around answers).
SMOLLM3 = (
    "{%- set reasoning_mode = '/no_think' if (enable_thinking is defined and enable_thinking is false) else '/think' -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\nReasoning Mode: ' + reasoning_mode + '\\n\\n' }}"
    "{{- '## Custom Instructions\\n\\n' }}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' }}"
    "{%- else -%}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n\\n' }}{%- endif -%}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{% generation %}{{- '<|im_start|>assistant\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if reasoning_mode == '/think' -%}{{- '<|im_start|>assistant\\n' }}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# family -> template, special tokens, bos / eos / pad, the end-of-turn that closes every assistant span, and
# what the template says about a system prompt: "ok", or the error loraforge must turn into one line.
FAMILY_CHAT = {
    "llama": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                            "<|end_header_id|>", "<|eot_id|>"],
                  bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", eot="<|eot_id|>"),
    "qwen2": dict(template=QWEN25, specials=[], bos=None, eos="<|im_end|>", pad="<|endoftext|>", eot="<|im_end|>"),
    "qwen3": dict(template=QWEN3, specials=[], bos=None, eos="<|im_end|>", pad="<|endoftext|>", eot="<|im_end|>"),
    "qwen3_moe": dict(template=QWEN3, specials=[], bos=None, eos="<|im_end|>", pad="<|endoftext|>", eot="<|im_end|>"),
    "mixtral": dict(template=MISTRAL, specials=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>",
                    pad="<|endoftext|>", eot="</s>"),
    "mistral": dict(template=MISTRAL, specials=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>",
                    pad="<|endoftext|>", eot="</s>"),
    "gemma2": dict(template=GEMMA2, specials=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
                   bos="<bos>", eos="<end_of_turn>", pad="<pad>", eot="<end_of_turn>",
                   system="System role not supported"),
    "gemma3_text": dict(template=GEMMA3, specials=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
                        bos="<bos>", eos="<end_of_turn>", pad="<pad>", eot="<end_of_turn>"),
    "phi3": dict(template=PHI3, specials=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], bos=None,
                 eos="<|endoftext|>", pad="<|endoftext|>", eot="<|end|>"),
    "phi4": dict(template=PHI4, specials=["<|im_sep|>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                 eot="<|im_end|>"),
    "smollm2": dict(template=SMOLLM2, specials=[], bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>",
                    eot="<|im_end|>"),
    "smollm3": dict(template=SMOLLM3, specials=[], bos=None, eos="<|im_end|>", pad="<|endoftext|>", eot="<|im_end|>"),
}


def family_tokenizer(base, family: str):
    """The tests' tiny BPE tokenizer with this family's special tokens, bos/eos/pad and chat template."""
    import copy

    spec = FAMILY_CHAT[family]
    tok = copy.deepcopy(base)
    if spec["specials"]:
        tok.add_special_tokens({"additional_special_tokens": spec["specials"]})
    tok.bos_token = spec["bos"]
    tok.eos_token, tok.pad_token = spec["eos"], spec["pad"]
    tok.chat_template = spec["template"]
    return tok
