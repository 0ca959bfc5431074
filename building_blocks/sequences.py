"""
Token sequences and batches, the shapes every stage feeds the model: prompts left-padded for sampling
(encode_prompts), prompt + response examples with a loss mask on the response (build_sft_example,
encode_demos: SFT's demonstrations, PPO-ptx's, DPO's pair halves) and their right-padded batches (collate).

Shape legend: B rows, Tp prompt length (left-padded), T prompt + response length (right-padded).
"""
import tokenizer as tok
from utils import fit_prompt, pad_batch


def encode_prompts(enc, prompts, room, truncate):
    """Prompt strings -> left-padded (ids (B, Tp), mask (B, Tp)), each cut from the left to `room` tokens."""
    return pad_batch([fit_prompt(tok.encode(enc, p), room, truncate, f"prompt {p[:40]!r}") for p in prompts],
                     tok.pad_id(enc), left=True)


def build_sft_example(prompt_ids, response_ids):
    """ids = prompt + response (response ends with EOS); loss_mask[i] = 1 iff ids[i] is a response token."""
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def encode_demos(enc, pairs, block_size, truncate=True):
    """[(prompt, response)] -> [(ids, loss_mask)]; a prompt too long for block_size is cut from the left
    (truncate=True, with a warning) or is an error naming the demonstration."""
    out = []
    for i, (p, r) in enumerate(pairs):
        resp = tok.encode(enc, r)[: 3 * block_size // 4]   # a (real-data) response this long is cut off
        prompt = fit_prompt(tok.encode(enc, p), block_size - len(resp), truncate, f"demonstration {i}")
        out.append(build_sft_example(prompt, resp))
    return out


def collate(examples, pad_id, device):
    """[(ids, loss_mask)] -> ids, attention mask, loss mask, each (B, T), right-padded."""
    ids, mask = pad_batch([e[0] for e in examples], pad_id, left=False)   # (B, T), (B, T)
    loss_mask, _ = pad_batch([e[1] for e in examples], 0, left=False)     # (B, T)
    return ids.to(device), mask.to(device), loss_mask.to(device)
