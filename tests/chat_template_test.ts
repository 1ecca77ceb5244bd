/** Chat templates from tokenizer_config.json, rendered with @huggingface/jinja. */

import assert from "node:assert/strict";
import { tokenizerFromData } from "../runtime/tokenizer/load_tokenizer.ts";
import type { ChatMessage } from "../runtime/tokenizer/tokenizer.ts";
import { HfTokenizer } from "../runtime/tokenizer/tokenizer_hf.ts";
import { Llama2cTokenizer } from "../runtime/tokenizer/tokenizer_llama2c.ts";
import { tinyConfigJson, tinyTokenizerBin, tinyTokenizerJson } from "./tokenizer_helpers.ts";

/** Llama-2-chat's template, as in meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json. */
const LLAMA2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}" +
  "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}" +
  "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}" +
  "{% for message in loop_messages %}" +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}" +
  "{% endif %}" +
  "{% if loop.index0 == 0 and system_message != false %}" +
  "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
  "{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}" +
  "{% endif %}{% endfor %}";

/** A ChatML template. */
const CHATML_TEMPLATE = "{% for message in messages %}" +
  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const CHAT: ChatMessage[] = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "Hi there " },
  { role: "assistant", content: "Hello." },
  { role: "user", content: "Tell me a story." },
];

Deno.test("Llama-2 chat template from tokenizer_config.json", () => {
  const tok = new HfTokenizer(
    tinyTokenizerJson(),
    tinyConfigJson({ chat_template: LLAMA2_TEMPLATE }),
  );
  assert.deepEqual(
    tok.applyChatTemplate(CHAT),
    "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s>" +
      "<s>[INST] Tell me a story. [/INST]",
  );
  // The template's "<s>" is the BOS token: encode such text with { bos: false }.
  const ids = tok.encode(tok.applyChatTemplate(CHAT.slice(3)), { bos: false });
  assert.deepEqual(ids[0], tok.bosId);
  assert.deepEqual(ids.filter((id) => id === tok.bosId).length, 1);
});

Deno.test("ChatML template, with and without the generation prompt", () => {
  const tok = new HfTokenizer(
    tinyTokenizerJson(),
    tinyConfigJson({ chat_template: CHATML_TEMPLATE }),
  );
  const messages = CHAT.slice(0, 2);
  const body = "<|im_start|>system\nYou are terse.<|im_end|>\n" +
    "<|im_start|>user\nHi there <|im_end|>\n";
  assert.deepEqual(tok.applyChatTemplate(messages), body);
  assert.deepEqual(
    tok.applyChatTemplate(messages, { addGenerationPrompt: true }),
    body + "<|im_start|>assistant\n",
  );
});

Deno.test("named chat templates: the one called default is used", () => {
  const tok = new HfTokenizer(
    tinyTokenizerJson(),
    tinyConfigJson({
      chat_template: [
        { name: "tool_use", template: "tools" },
        { name: "default", template: "{{ messages[0].content }}" },
      ],
    }),
  );
  assert.deepEqual(tok.applyChatTemplate([{ role: "user", content: "x" }]), "x");
});

Deno.test("chat template errors are TokenizerErrors", () => {
  const none = new HfTokenizer(tinyTokenizerJson(), tinyConfigJson(), { source: "m/tok.json" });
  assert.throws(() => none.applyChatTemplate(CHAT), {
    name: "TokenizerError",
    message: /m\/tok\.json.*no chat template.*--tokenizer/,
  });
  assert.throws(() => new Llama2cTokenizer(tinyTokenizerBin()).applyChatTemplate(CHAT), {
    name: "TokenizerError",
    message: /no chat template/,
  });
  const llama2 = new HfTokenizer(
    tinyTokenizerJson(),
    tinyConfigJson({ chat_template: LLAMA2_TEMPLATE }),
  );
  assert.throws(() => llama2.applyChatTemplate([{ role: "assistant", content: "first?" }]), {
    name: "TokenizerError",
    message: /roles must alternate/,
  });
  const broken = new HfTokenizer(
    tinyTokenizerJson(),
    tinyConfigJson({ chat_template: "{% if %}" }),
  );
  assert.throws(() => broken.applyChatTemplate(CHAT), {
    name: "TokenizerError",
    message: /does not parse/,
  });
});

Deno.test("a llama2.c tokenizer renders an attached template, also after toData()", async () => {
  const tok = new Llama2cTokenizer(tinyTokenizerBin(), { chatTemplate: LLAMA2_TEMPLATE });
  const back = await tokenizerFromData(tok.toData());
  const expected = "<s>[INST] Tell me a story. [/INST]";
  assert.deepEqual(tok.applyChatTemplate(CHAT.slice(3)), expected);
  assert.deepEqual(back.applyChatTemplate(CHAT.slice(3)), expected);
});
