//! One engine step, vLLM v1 style: schedule running requests (decodes and unfinished prefill chunks) under the token
//! budget, preempting the newest admitted (or lowest-priority) request when KV blocks run out; then admit waiting
//! requests with prefix-cache hits while budget, sequence slots and blocks last; time the batch with the profile;
//! advance computed tokens, register newly full blocks, sample one token per request that reached the end of its
//! known tokens, and finish requests that hit EOS, a stop id or their length.

use rand_distr::{Distribution, LogNormal};

use super::request::{EOS_TOKEN, output_token};
use super::{
    Engine, Event, FinishReason, Handoff, KvEvent, KvTransfer, Pin, Pull, RequestTimes,
    SchedulingPolicy, State, StepOutput, Usage,
};
use crate::profile::BatchShape;

impl Engine {
    /// Run one engine step starting at `now` (see the module docs for the driver's contract).
    pub fn step(&mut self, now: f64) -> StepOutput {
        let mut out = StepOutput {
            start: now,
            kv_events: std::mem::take(&mut self.pending_kv),
            ..Default::default()
        };
        self.expire_pins(now);
        self.finish_pulls(now, &mut out);

        let mut budget = self.cfg.profile.max_num_batched_tokens;
        let mut sched = std::mem::take(&mut self.scratch_sched);
        sched.clear();
        let mut preempted_any = false;

        // 1. Running requests, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let slot = self.running[i];
            let want = {
                let r = self.req(slot);
                (r.num_tokens() - r.num_computed).min(budget)
            };
            let mut scheduled = false;
            loop {
                if self.grow(slot, want, &mut out) {
                    scheduled = true;
                    break;
                }
                let vi = self.pick_victim();
                let victim = self.running.remove(vi);
                if vi < i {
                    // Only under priority scheduling: a request already scheduled this step loses its slot.
                    i -= 1;
                    if let Some(p) = sched.iter().position(|&(s, _)| s == victim) {
                        budget += sched.remove(p).1;
                    }
                }
                self.preempt(victim);
                out.stats.preemptions += 1;
                preempted_any = true;
                if victim == slot {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            sched.push((slot, want));
            budget -= want;
            i += 1;
        }

        // 2. Waiting requests (not in a step that preempted, as vLLM).
        if !preempted_any {
            let max_seqs = self.cfg.profile.max_num_seqs as usize;
            while budget > 0 && self.running.len() < max_seqs {
                let Some((&key, &slot)) = self.waiting.first_key_value() else {
                    break;
                };
                if self.req(slot).pull == Pull::NotStarted {
                    if !self.start_pull(slot, now, &mut out) {
                        break;
                    }
                    self.waiting.remove(&key);
                    continue;
                }
                let Some(want) = self.admit(slot, budget, &mut out) else {
                    break;
                };
                self.waiting.remove(&key);
                self.running.push(slot);
                let r = self.req_mut(slot);
                r.state = State::Running;
                r.first_scheduled.get_or_insert(now);
                sched.push((slot, want));
                budget -= want;
            }
        }

        if sched.is_empty() {
            self.scratch_sched = sched;
            if !self.waiting.is_empty() && self.running.is_empty() {
                self.stalled = true;
            }
            return out;
        }

        // 3. Time the batch.
        let mut shape = BatchShape::default();
        for &(slot, q) in &sched {
            let r = self.req(slot);
            if q == 1 && r.num_computed > 0 && r.num_computed + 1 == r.num_tokens() {
                shape.add_decode(r.num_computed + 1);
                out.stats.num_decode_seqs += 1;
            } else {
                shape.add_prefill(q, r.num_computed);
                out.stats.num_prefill_tokens += q;
            }
            out.stats.num_scheduled_tokens += q;
        }
        let mut duration = self.cfg.profile.step_time(&shape);
        if self.cfg.jitter > 0.0 {
            let s = self.cfg.jitter;
            if let Ok(d) = LogNormal::new(-s * s / 2.0, s) {
                duration *= d.sample(&mut self.rng);
            }
        }
        if self.cfg.speedup > 0.0 {
            duration /= self.cfg.speedup;
        }
        out.duration = duration;
        let end = now + duration;

        // 4. Advance, cache full blocks, sample, finish.
        let max_model_len = self.cfg.profile.max_model_len;
        let mut any_done = false;
        for &(slot, q) in &sched {
            self.req_mut(slot).num_computed += q;
            self.cache_full_blocks(slot, &mut out);
            let r = self.req_mut(slot);
            if r.num_computed < r.num_tokens() {
                continue;
            }
            let idx = r.output.len() as u32;
            let token = if r.eos_at == Some(idx + 1) {
                EOS_TOKEN
            } else {
                output_token(r.req.gen_seed, idx)
            };
            if idx == 0 {
                out.stats.num_prompt_tokens += r.prompt_len();
            }
            out.stats.num_generation_tokens += 1;
            r.output.push(token);
            r.first_token.get_or_insert(end);
            out.events.push(Event::Token {
                id: r.req.id,
                token,
                index: idx,
            });
            let n_out = idx + 1;
            let finish = if n_out >= r.req.max_tokens || r.num_tokens() >= max_model_len {
                Some((FinishReason::Length, None))
            } else if n_out >= r.req.min_tokens
                && ((!r.req.ignore_eos && token == EOS_TOKEN)
                    || r.req.stop_token_ids.contains(&token))
            {
                Some((FinishReason::Stop, Some(token)))
            } else {
                None
            };
            if let Some((reason, stop_token)) = finish {
                any_done = true;
                self.finish(slot, reason, stop_token, end, &mut out);
            }
        }
        if any_done {
            let reqs = &self.reqs;
            self.running.retain(|&s| reqs[s as usize].is_some());
        }
        self.scratch_sched = sched;
        out
    }

    /// FCFS: the newest admitted (last of `running`); priority: highest (priority, arrival) value.
    fn pick_victim(&self) -> usize {
        match self.cfg.scheduling {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
            SchedulingPolicy::Priority => {
                let mut best = 0;
                for (k, &s) in self.running.iter().enumerate() {
                    let r = self.req(s);
                    let b = self.req(self.running[best]);
                    if (r.req.priority, r.arrival_seq) > (b.req.priority, b.arrival_seq) {
                        best = k;
                    }
                }
                best
            }
        }
    }

    /// Preempt by recompute: free blocks (tail first), forget computed tokens, back to the front of waiting.
    fn preempt(&mut self, slot: u32) {
        let front = self.next_front_seq;
        let policy = self.cfg.scheduling;
        let r = self.reqs[slot as usize]
            .as_mut()
            .unwrap_or_else(|| unreachable!("live slot"));
        for &b in r.blocks.iter().rev() {
            self.pool.release(b);
        }
        r.blocks.clear();
        r.num_computed = 0;
        r.num_cached_blocks = 0;
        r.state = State::Waiting;
        r.queue_key = match policy {
            SchedulingPolicy::Fcfs => (0, front),
            SchedulingPolicy::Priority => (r.req.priority, r.arrival_seq),
        };
        let key = r.queue_key;
        self.next_front_seq -= 1;
        self.waiting.insert(key, slot);
    }

    /// Allocate blocks so a running request can compute `q` more tokens. False if the pool is short.
    fn grow(&mut self, slot: u32, q: u32, out: &mut StepOutput) -> bool {
        let bs = self.block_size();
        let (have, need_total) = {
            let r = self.req(slot);
            (r.blocks.len() as u32, (r.num_computed + q).div_ceil(bs))
        };
        if need_total <= have {
            return true;
        }
        let mut new_blocks = std::mem::take(&mut self.scratch_blocks);
        new_blocks.clear();
        let mut evicted = std::mem::take(&mut self.scratch_evicted);
        evicted.clear();
        let ok = self
            .pool
            .allocate(need_total - have, &mut new_blocks, &mut evicted);
        if ok {
            self.req_mut(slot).blocks.extend_from_slice(&new_blocks);
            self.emit_removed(&evicted, out);
        }
        self.scratch_blocks = new_blocks;
        self.scratch_evicted = evicted;
        ok
    }

    fn emit_removed(&self, evicted: &[u64], out: &mut StepOutput) {
        if !evicted.is_empty() && self.cfg.emit_kv_events && self.cfg.enable_prefix_caching {
            out.kv_events.push(KvEvent::BlockRemoved {
                block_hashes: evicted.to_vec(),
            });
        }
    }

    /// Local prefix hit of a waiting request with nothing computed: the blocks and the hit tokens.
    fn find_hits(&mut self, slot: u32, limit_tokens: u32) -> (Vec<u32>, u32) {
        let mut hits = std::mem::take(&mut self.scratch_blocks);
        hits.clear();
        if !self.cfg.enable_prefix_caching || limit_tokens == 0 {
            return (hits, 0);
        }
        let bs = self.block_size();
        let max_blocks = (limit_tokens / bs) as usize;
        let mut scratch = std::mem::take(&mut self.scratch_tokens);
        let r = self.reqs[slot as usize]
            .as_mut()
            .unwrap_or_else(|| unreachable!("live slot"));
        for i in 0..max_blocks {
            if r.ensure_hashes(&self.hasher, bs as usize, i + 1, &mut scratch) <= i {
                break;
            }
            match self.pool.lookup(&r.hashes[i]) {
                Some(b) => hits.push(b),
                None => break,
            }
        }
        self.scratch_tokens = scratch;
        let n = hits.len() as u32 * bs;
        (hits, n)
    }

    /// Touch `hits` and allocate the blocks to hold `total_tokens`, all or nothing.
    fn allocate_with_hits(
        &mut self,
        slot: u32,
        hits: &[u32],
        total_tokens: u32,
        out: &mut StepOutput,
    ) -> bool {
        let bs = self.block_size();
        let need_new = total_tokens.div_ceil(bs).saturating_sub(hits.len() as u32);
        let evictable = hits
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count() as u32;
        if self.pool.free_count() < need_new + evictable {
            return false;
        }
        for &b in hits {
            self.pool.touch(b);
        }
        let mut new_blocks = Vec::with_capacity(need_new as usize);
        let mut evicted = std::mem::take(&mut self.scratch_evicted);
        evicted.clear();
        let ok = self.pool.allocate(need_new, &mut new_blocks, &mut evicted);
        debug_assert!(ok);
        self.emit_removed(&evicted, out);
        self.scratch_evicted = evicted;
        let r = self.req_mut(slot);
        r.blocks.clear();
        r.blocks.extend_from_slice(hits);
        r.blocks.extend_from_slice(&new_blocks);
        r.num_cached_blocks = hits.len() as u32;
        ok
    }

    /// Admit a waiting request: prefix lookup (if nothing computed), allocation for its first chunk. Returns the
    /// chunk size, or None when blocks run short (stop admitting).
    fn admit(&mut self, slot: u32, budget: u32, out: &mut StepOutput) -> Option<u32> {
        let (computed, num_tokens) = {
            let r = self.req(slot);
            (r.num_computed, r.num_tokens())
        };
        if computed > 0 {
            // A decode leg whose pull completed: blocks are already allocated.
            let want = (num_tokens - computed).min(budget);
            return self.grow(slot, want, out).then_some(want);
        }
        let (hits, hit_tokens) = self.find_hits(slot, num_tokens - 1);
        let want = (num_tokens - hit_tokens).min(budget);
        let ok = self.allocate_with_hits(slot, &hits, hit_tokens + want, out);
        self.scratch_blocks = hits;
        if !ok {
            return None;
        }
        out.stats.prefix_queries += u64::from(num_tokens);
        out.stats.prefix_hits += u64::from(hit_tokens);
        let r = self.req_mut(slot);
        r.num_computed = hit_tokens;
        r.cached_tokens.get_or_insert(hit_tokens);
        Some(want)
    }

    /// Decode leg: local hits, allocate the whole prompt, start the pull of the rest. False if blocks run short.
    fn start_pull(&mut self, slot: u32, now: f64, out: &mut StepOutput) -> bool {
        let bs = self.block_size();
        let (plen, remote_tokens) = {
            let r = self.req(slot);
            let remote = match &r.req.kv {
                KvTransfer::RemotePrefill {
                    remote_block_ids, ..
                } => remote_block_ids.len() as u32 * bs,
                _ => 0,
            };
            (r.prompt_len(), remote)
        };
        let (hits, hit_tokens) = self.find_hits(slot, plen - 1);
        let ok = self.allocate_with_hits(slot, &hits, plen, out);
        self.scratch_blocks = hits;
        if !ok {
            return false;
        }
        let pulled = remote_tokens.min(plen).saturating_sub(hit_tokens);
        out.stats.prefix_queries += u64::from(plen);
        out.stats.prefix_hits += u64::from(hit_tokens);
        out.stats.external_queries += u64::from(plen - hit_tokens);
        out.stats.external_hits += u64::from(pulled);
        let speed = if self.cfg.speedup > 0.0 {
            self.cfg.speedup
        } else {
            1.0
        };
        let ready = now + self.cfg.transfer.time(pulled) / speed;
        let r = self.req_mut(slot);
        r.pull = Pull::InFlight;
        r.state = State::Pulling;
        r.ready_at = ready;
        r.pulled_tokens = pulled;
        r.pull_local_hit = hit_tokens;
        r.first_scheduled.get_or_insert(now);
        r.cached_tokens.get_or_insert(hit_tokens + pulled);
        self.pulling.push(slot);
        true
    }

    /// Pulls due by `now` complete: their tokens count as computed (the last prompt token is always recomputed),
    /// full blocks are registered, the request is runnable, and the prefill pod is told to unpin.
    fn finish_pulls(&mut self, now: f64, out: &mut StepOutput) {
        if self.pulling.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.pulling.len() {
            let slot = self.pulling[k];
            if self.req(slot).ready_at > now {
                k += 1;
                continue;
            }
            self.pulling.swap_remove(k);
            let r = self.req_mut(slot);
            let plen = r.prompt_len();
            r.num_computed = (r.pull_local_hit + r.pulled_tokens).min(plen.saturating_sub(1));
            r.pull = Pull::None;
            r.state = State::Waiting;
            let key = r.queue_key;
            let done = match &r.req.kv {
                KvTransfer::RemotePrefill {
                    remote_engine_id,
                    remote_block_ids,
                    remote_host,
                    remote_port,
                    remote_request_id,
                } => Some(Event::TransferDone {
                    remote_engine_id: remote_engine_id.clone(),
                    remote_host: remote_host.clone(),
                    remote_port: *remote_port,
                    remote_block_ids: remote_block_ids.clone(),
                    remote_request_id: remote_request_id.clone(),
                }),
                _ => None,
            };
            self.cache_full_blocks(slot, out);
            self.waiting.insert(key, slot);
            out.events.extend(done);
            self.stalled = false;
        }
        // Keep completion order deterministic regardless of swap_remove.
        self.pulling
            .sort_unstable_by_key(|&s| self.reqs[s as usize].as_ref().map_or(0, |r| r.arrival_seq));
    }

    /// Register the request's newly full computed blocks in the prefix index and emit one BlockStored for them.
    fn cache_full_blocks(&mut self, slot: u32, out: &mut StepOutput) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.block_size();
        let emit = self.cfg.emit_kv_events;
        let mut scratch = std::mem::take(&mut self.scratch_tokens);
        let r = self.reqs[slot as usize]
            .as_mut()
            .unwrap_or_else(|| unreachable!("live slot"));
        let full = ((r.num_computed / bs) as usize).min(r.blocks.len());
        let first = r.num_cached_blocks as usize;
        if full <= first {
            self.scratch_tokens = scratch;
            return;
        }
        r.ensure_hashes(&self.hasher, bs as usize, full, &mut scratch);
        let mut stored_hashes = Vec::new();
        let mut stored_tokens = Vec::new();
        for i in first..full {
            let b = r.blocks[i];
            if !self.pool.is_hashed(b) {
                self.pool.cache(b, &r.hashes[i]);
                if emit {
                    stored_hashes.push(policies::blocks::low64(&r.hashes[i]));
                    r.tokens_into(i * bs as usize, bs as usize, &mut stored_tokens);
                }
            }
        }
        r.num_cached_blocks = full as u32;
        if emit && !stored_hashes.is_empty() {
            let parent = (first > 0).then(|| policies::blocks::low64(&r.hashes[first - 1]));
            out.kv_events.push(KvEvent::BlockStored {
                block_hashes: stored_hashes,
                parent_block_hash: parent,
                token_ids: stored_tokens,
                block_size: bs,
                lora_name: r.req.lora.clone(),
            });
        }
        self.scratch_tokens = scratch;
    }

    /// Finish a request: free (or, for a prefill leg ending by length, pin) its blocks and emit `Finished`.
    fn finish(
        &mut self,
        slot: u32,
        reason: FinishReason,
        stop_token: Option<u32>,
        end: f64,
        out: &mut StepOutput,
    ) {
        let Some(mut r) = self.reqs[slot as usize].take() else {
            return;
        };
        self.free_slots.push(slot);
        self.index.remove(&r.req.id);
        let handoff = if reason == FinishReason::Length && r.req.kv == KvTransfer::RemoteDecode {
            let rid = r.req.id.to_string();
            let blocks = std::mem::take(&mut r.blocks);
            self.pinned_blocks += blocks.len() as u32;
            let handoff = Handoff {
                remote_engine_id: self.cfg.engine_id.clone(),
                remote_block_ids: blocks.clone(),
                remote_request_id: rid.clone(),
            };
            if let Some(old) = self.pins.insert(
                rid,
                Pin {
                    blocks,
                    expires: end + self.cfg.pinned_timeout_s,
                },
            ) {
                self.unpin(old);
            }
            Some(handoff)
        } else {
            for &b in r.blocks.iter().rev() {
                self.pool.release(b);
            }
            None
        };
        out.events.push(Event::Finished {
            id: r.req.id,
            reason,
            stop_token,
            usage: Usage {
                prompt_tokens: r.prompt_len(),
                completion_tokens: r.output.len() as u32,
                cached_tokens: r.cached_tokens.unwrap_or(0),
            },
            times: RequestTimes {
                arrival: r.arrival,
                first_scheduled: r.first_scheduled.unwrap_or(end),
                first_token: r.first_token.unwrap_or(end),
                finished: end,
            },
            handoff,
        });
    }
}
