/**
 * OpenAI response bodies as vLLM shapes them (chat.completion, text_completion and
 * their streamed chunks), marked as simulated: `system_fingerprint` names the
 * simulation and the first generated token is "[simulated]".
 */
import type { SimPrompt } from './prompt.js';

/** `system_fingerprint` of every simulated answer. */
export const SIM_FINGERPRINT = 'epd-transfer-simulation';

function created(): number {
  return Math.floor(Date.now() / 1000);
}

/** The response id vLLM would use. */
export function responseId(prompt: SimPrompt, requestId: string): string {
  return `${prompt.endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${requestId}`;
}

function usage(prompt: SimPrompt, completion: number) {
  return { prompt_tokens: prompt.tokens, completion_tokens: completion, total_tokens: prompt.tokens + completion };
}

/** A whole (non-streamed) answer. */
export function completionBody(prompt: SimPrompt, requestId: string, model: string, text: string, tokens: number, extra: Record<string, unknown> = {}) {
  const base = { id: responseId(prompt, requestId), created: created(), model, system_fingerprint: SIM_FINGERPRINT, usage: usage(prompt, tokens), ...extra };
  return prompt.endpoint === 'chat'
    ? { ...base, object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: 'length' }] }
    : { ...base, object: 'text_completion', choices: [{ index: 0, text, logprobs: null, finish_reason: 'length' }] };
}

/** One streamed chunk carrying `text` (and the role, for the first chat chunk). */
export function chunkBody(prompt: SimPrompt, requestId: string, model: string, text: string, first: boolean, last: boolean) {
  const base = { id: responseId(prompt, requestId), created: created(), model, system_fingerprint: SIM_FINGERPRINT };
  const finish = last ? 'length' : null;
  return prompt.endpoint === 'chat'
    ? { ...base, object: 'chat.completion.chunk', choices: [{ index: 0, delta: first ? { role: 'assistant', content: text } : { content: text }, logprobs: null, finish_reason: finish }] }
    : { ...base, object: 'text_completion', choices: [{ index: 0, text, logprobs: null, finish_reason: finish }] };
}

/** The final usage chunk (`stream_options.include_usage`). */
export function usageChunk(prompt: SimPrompt, requestId: string, model: string, tokens: number) {
  return {
    id: responseId(prompt, requestId),
    object: prompt.endpoint === 'chat' ? 'chat.completion.chunk' : 'text_completion',
    created: created(),
    model,
    system_fingerprint: SIM_FINGERPRINT,
    choices: [],
    usage: usage(prompt, tokens),
  };
}
