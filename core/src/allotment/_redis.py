"""``redis://host:port/db``: a ledger on a Redis server, shared by processes on many machines.

Every operation is one Lua script run by the server (``EVALSHA``), so it is atomic across
the budget's whole ancestor chain, which the script walks on the server: a reserve, settle,
release, charge, child opening or close is one round trip whatever the depth. The scripts
port the accounting of ``_ledger`` line by line (the escrow rule, rate windows, deadlines,
closed budgets, period rollover with ``carried``), in integer units. Each script is the
shared helpers (keys and exact JSON; record loading and the ported ``_ledger`` functions)
followed by one operation's ``main``; the client passes ``now`` and the UTC period starts
of ``now``, so the calendar stays in Python and the server's clock is never read.

Keys, under a prefix (``?prefix=``, default ``allotment:``):

- ``node:<id>``: a node, as MessagePack (exact for integers and doubles, and quick to
  read in Lua): limits, spent, held, committed, carried, rates and their log, deadline,
  period, counters, meta (values as JSON text);
- ``children:<id>`` and ``history:<id>``: lists of a node's child ids (in opening order) and
  of its past periods, kept apart so the hot path never reads them;
- ``roots``: root ids in creation order;
- ``hold:<id>``: a hold (MessagePack); once ended it stays as a tombstone (with a Redis TTL,
  ``?tombstone_ttl=`` seconds, default a day) so a repeated settle or release charges
  nothing and a client's retry of its own request gets its first answer again;
- ``expiry``: open holds with a ttl, scored by when they expire (``seq:holds`` numbers
  them, so expired holds are reported in the order they were reserved);
- ``op:<nonce>``: the answer to a charge, open, close, top-up or expire, kept as long as
  tombstones, so re-sending one after a lost reply does not apply it twice.

Integers are exact in Lua up to 2**53 - 1 (nine million dollars in nano-dollars); an amount
that would pass it is refused and changes nothing. Scripts write nothing until the
accounting is done, so a refused or failed operation leaves no trace.

When the server does not answer (connection refused, socket timeout), the ledger fails
closed: ``LedgerUnreachable`` (a ``LedgerError`` naming the URL) and no call is admitted.
With ``?on_error=open`` it fails open instead: a reservation is admitted without the server
(counted in ``failed_open`` and logged), and settles, releases, charges and closes are
queued and re-sent, each with its original nonce, once the server answers again; the spend
of a call admitted that way is recorded with ``failed_open_calls``.

The scripts read keys they compute from the chain, so they need one Redis server (or a
primary with replicas), not a cluster.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._errors import ConfigurationError, InvalidAmount, LedgerError
from ._ledger import NodeSpec, NodeState, Refusal, Settled
from ._limits import period_start

try:
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import AuthorizationError
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - exercised only without redis-py
    raise ConfigurationError("the redis:// ledger needs redis-py: pip install 'redis>=5'") from e

log = logging.getLogger("allotment")

OnError = Literal["closed", "open"]

SCHEMES = ("redis://", "rediss://")
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "allotment:"
DEFAULT_TOMBSTONE_TTL = 86400
"""Seconds an ended hold and an operation's answer are kept. A settle arriving later still
charges nothing (the hold is then unknown); only its status changes from ended to unknown."""
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_RETRIES = 2
MAX_EXACT = 2**53 - 1
"""The largest integer a Lua number (a double) keeps exactly."""
FAILED_OPEN = "failed_open_calls"
"""The dimension counting calls admitted while the server did not answer (fail-open);
the ``settle_unrecorded`` script writes it."""

_PERIODS = ("hour", "day", "week", "month")
_OPTIONS = ("prefix", "on_error", "retries", "tombstone_ttl")
_MAX_LOCAL_HOLDS = 100_000


class LedgerUnreachable(LedgerError):
    """The Redis server did not answer (refused, unreachable, or slower than the socket
    timeout). Fail-closed: no call was admitted. A settle that timed out may or may not
    have been applied; settling the hold again is safe either way."""


# -- the Lua scripts ----------------------------------------------------------------------

_COMMON = r"""
local PREFIX = ARGV[1]
local ROOTS = PREFIX .. 'roots'
local EXPIRY = PREFIX .. 'expiry'

local function key(kind, id)
  return PREFIX .. kind .. ':' .. id
end

local EXACT = 9007199254740991  -- 2^53 - 1: past it a Lua number is no exact integer

-- An error the client turns into a typed exception; nothing has been written yet.
local function refuse(kind, what)
  error({allotment = kind, what = what})
end

local function exact(x)
  if x > EXACT or x < -EXACT then
    refuse('inexact', string.format('%.17g', x))
  end
  return x
end

-- JSON for the client that keeps integers and doubles exact (cjson.encode keeps 14
-- digits only). A table is an array when it has a first element or its key says so (the
-- only places an empty array can appear), else an object with sorted keys.
local ARRAY_KEYS = {rates = true, rate_log = true}
local encode

local function encode_number(x)
  if x ~= x or x == math.huge or x == -math.huge then
    refuse('nonfinite', '')
  end
  if x == math.floor(x) and x >= -EXACT and x <= EXACT then
    return string.format('%d', x)
  end
  return string.format('%.17g', x)
end

encode = function(value, array)
  local t = type(value)
  if t == 'number' then return encode_number(value) end
  if t == 'string' then return cjson.encode(value) end
  if t == 'boolean' then return value and 'true' or 'false' end
  if t ~= 'table' then return 'null' end
  local parts = {}
  if array or value[1] ~= nil then
    for i = 1, #value do parts[i] = encode(value[i]) end
    return '[' .. table.concat(parts, ',') .. ']'
  end
  local keys = {}
  for k in pairs(value) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do
    parts[i] = cjson.encode(k) .. ':' .. encode(value[k], ARRAY_KEYS[k])
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
"""

# Shared by every script that changes the ledger. ARGV: prefix, operation nonce, now,
# period starts of now ({hour=, day=, week=, month=}), seconds to keep tombstones; then
# the operation's own arguments from ARGV[6].
_ACCOUNTING = r"""
local OP = ARGV[2]
local NOW_TEXT = ARGV[3]
local NOW = tonumber(NOW_TEXT)
local STARTS = cjson.decode(ARGV[4])
local KEEP = ARGV[5]

local function opt(value)  -- JSON null as nil
  if value == cjson.null then return nil end
  return value
end

-- Records are stored as MessagePack (exact for doubles and integers, and quick), loaded
-- once per script and written back at the end, only if changed.
local pack_record, unpack_record = cmsgpack.pack, cmsgpack.unpack
local nodes, stored, kids, writes = {}, {}, {}, {}

local function later(...)  -- a write to make once the accounting is done
  writes[#writes + 1] = {...}
end

local function find(id)
  local rec = nodes[id]
  if rec == nil then
    local packed = redis.call('GET', key('node', id))
    if not packed then return nil end
    rec = unpack_record(packed)
    nodes[id], stored[id] = rec, packed
  end
  return rec
end

local function node(id)
  return find(id) or refuse('unknown', id)
end

local function chain(id)  -- the node and its ancestors, the node first
  local out, rec = {}, node(id)
  while rec do
    out[#out + 1] = rec
    rec = rec.parent and node(rec.parent)
  end
  return out
end

local function children(id)
  local list = kids[id]
  if list == nil then
    list = redis.call('LRANGE', key('children', id), 0, -1)
    kids[id] = list
  end
  return list
end

local function flush()
  for id, rec in pairs(nodes) do
    local packed = pack_record(rec)
    if packed ~= stored[id] then redis.call('SET', key('node', id), packed) end
  end
  for _, w in ipairs(writes) do redis.call(unpack(w)) end
end

local function snapshot(rec)
  return '{"node":' .. encode(rec) .. ',"children":' .. encode(children(rec.id), true) .. '}'
end

-- Replies are JSON text; the answer to an operation that its nonce protects is kept.
local function replay()
  return redis.call('GET', key('op', OP))
end

local function answer(reply, ttl)
  later('SET', key('op', OP), reply, 'EX', ttl or KEEP)
  return reply
end

-- amounts: maps {dim = x}; ordered amounts: lists of {dim, x} (a refusal names the first
-- dimension that does not fit, in the caller's order)

local function to_map(list)
  local m = {}
  for _, p in ipairs(list) do m[p[1]] = p[2] end
  return m
end

local function to_list(map)
  local dims = {}
  for d in pairs(map) do dims[#dims + 1] = d end
  table.sort(dims)
  local out = {}
  for i, d in ipairs(dims) do out[i] = {d, map[d]} end
  return out
end

local function copy(map)
  local out = {}
  for k, v in pairs(map) do out[k] = v end
  return out
end

local function add(target, amounts, sign)
  for dim, x in pairs(amounts) do
    local value = exact((target[dim] or 0) + sign * x)
    if value == 0 then target[dim] = nil else target[dim] = value end
  end
end

local function new_node(spec, id, parent)
  return {
    id = id, name = spec.name, path = id, parent = parent,
    limits = to_map(spec.limits), rates = spec.rates, deadline = opt(spec.deadline),
    created_at = NOW, spent = {}, held = {}, committed = {}, carried = {},
    closed = false, refusals = 0, open_holds = 0, rate_log = {}, meta = spec.meta,
  }
end

-- _ledger.check_chain
local function check_chain(ch)
  for _, m in ipairs(ch) do
    if m.closed then
      return {kind = 'closed', node = m.id, path = m.path, dim = 'closed'}
    end
    if m.deadline and NOW >= m.deadline then
      return {kind = 'deadline', node = m.id, path = m.path, dim = 'deadline'}
    end
  end
  return nil
end

-- _ledger.plan: new committed values for adding ordered amounts at ch[1]. An open child
-- that caps a dimension passes on only what leaves its escrow.
local function plan(ch, amounts, check)
  local changes = {}
  for _, pair in ipairs(amounts) do
    local dim, asked = pair[1], pair[2]
    local delta = asked
    for _, m in ipairs(ch) do
      local old = m.committed[dim] or 0
      local new = exact(old + delta)
      local limit = m.limits[dim]
      if limit == nil then
        changes[#changes + 1] = {m, dim, new}
      else
        if check and delta > 0 and new > limit then
          local spent = m.spent[dim] or 0
          return nil, {
            kind = 'limit', node = m.id, path = m.path, dim = dim,
            limit = limit, spent = spent, held = old - spent, asked = asked,
          }
        end
        changes[#changes + 1] = {m, dim, new}
        if m.parent ~= nil and not m.closed then
          delta = math.max(limit, new) - math.max(limit, old)
          if delta == 0 then break end
        end
      end
    end
  end
  return changes, nil
end

local function apply(changes)
  for _, c in ipairs(changes) do c[1].committed[c[2]] = c[3] end
end

-- _ledger.check_rates
local function check_rates(ch, amounts)
  for _, m in ipairs(ch) do
    if #m.rates > 0 then
      local longest = 0
      for _, r in ipairs(m.rates) do longest = math.max(longest, r[3]) end
      local kept = {}
      for _, e in ipairs(m.rate_log) do
        if e[1] > NOW - longest then kept[#kept + 1] = e end
      end
      m.rate_log = kept
      for _, r in ipairs(m.rates) do
        local dim, limit, window = r[1], r[2], r[3]
        local asked = amounts[dim] or 0
        if asked ~= 0 then
          local inside, used = {}, 0
          for _, e in ipairs(m.rate_log) do
            if e[1] > NOW - window then
              inside[#inside + 1] = e
              used = used + (e[3][dim] or 0)
            end
          end
          if used + asked > limit then
            local retry = nil
            if asked <= limit then
              local need = used + asked - limit
              for _, e in ipairs(inside) do  -- oldest first
                need = need - (e[3][dim] or 0)
                if need <= 0 then
                  retry = math.max(0, e[1] + window - NOW)
                  break
                end
              end
            end
            return {
              kind = 'rate', node = m.id, path = m.path,
              dim = dim .. ' per ' .. string.format('%g', window) .. 's',
              limit = limit, spent = used, held = 0, asked = asked, retry_after = retry,
            }
          end
        end
      end
    end
  end
  return nil
end

local function log_rates(ch, hold)
  for _, m in ipairs(ch) do
    if #m.rates > 0 then
      m.rate_log[#m.rate_log + 1] = {NOW, hold.id, copy(hold.amounts)}
    end
  end
end

-- Replace a hold's rate entries with its actual usage (nil: drop them, on release).
local function relog_rates(ch, hold_id, actual)
  for _, m in ipairs(ch) do
    if #m.rates > 0 then
      for i, e in ipairs(m.rate_log) do
        if e[2] == hold_id then
          if actual == nil then table.remove(m.rate_log, i) else e[3] = copy(actual) end
          break
        end
      end
    end
  end
end

-- _ledger.roll_period, on the chain's root
local function roll(ch)
  local root = ch[#ch]
  if root.period == nil or root.period_start == nil then return end
  local start = STARTS[root.period]
  if start <= root.period_start then return end
  later('RPUSH', key('history', root.id), encode({start = root.period_start, spent = root.spent}))
  later('LTRIM', key('history', root.id), -400, -1)
  -- Spend inside open escrowed children stays inside their escrow until they close;
  -- only what they spent since the last boundary is in root.spent.
  local inside = {}
  for _, cid in ipairs(children(root.id)) do
    local c = node(cid)
    if not c.closed then
      for d in pairs(c.limits) do
        local x = c.spent[d] or 0
        inside[d] = (inside[d] or 0) + x - (c.carried[d] or 0)
        if x ~= 0 then c.carried[d] = x end
      end
    end
  end
  for d, x in pairs(root.spent) do
    root.committed[d] = (root.committed[d] or 0) - (x - (inside[d] or 0))
  end
  root.spent = {}
  root.period_start = start
end

-- _ledger.do_reserve
local function do_reserve(ch, hold, ordered)
  local refusal = check_chain(ch) or check_rates(ch, hold.amounts)
  local changes
  if refusal == nil then changes, refusal = plan(ch, ordered, true) end
  if refusal ~= nil then
    ch[1].refusals = ch[1].refusals + 1
    return refusal
  end
  apply(changes)
  for _, m in ipairs(ch) do
    add(m.held, hold.amounts, 1)
    m.open_holds = m.open_holds + 1
  end
  log_rates(ch, hold)
  return nil
end

-- _ledger.do_end: settle (actual) or release (nil) an open hold; returns the overrun
local function do_end(ch, hold, actual)
  local charged = actual or {}
  local delta = copy(charged)
  add(delta, hold.amounts, -1)
  apply((plan(ch, to_list(delta), false)))
  for _, m in ipairs(ch) do
    add(m.held, hold.amounts, -1)
    add(m.spent, charged, 1)
    m.open_holds = m.open_holds - 1
  end
  relog_rates(ch, hold.id, actual)
  local overrun = {}
  for d, x in pairs(delta) do
    if x > 0 and hold.amounts[d] ~= nil then overrun[d] = x end
  end
  return overrun
end

local function end_hold(hold, state, result)
  hold.state, hold.ended_at, hold.ended_by, hold.result = state, NOW, OP, result
  later('SET', key('hold', hold.id), pack_record(hold), 'EX', KEEP)
  if hold.expires_at then later('ZREM', EXPIRY, hold.id) end
end

-- End every open hold whose ttl has passed (charging nothing); returns their ids.
local function sweep()
  local due = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', NOW_TEXT)) do
    local packed = redis.call('GET', key('hold', id))
    if packed then
      local hold = unpack_record(packed)
      if hold.state == 'open' then due[#due + 1] = hold end
    end
  end
  table.sort(due, function(a, b) return a.seq < b.seq end)  -- in the order reserved
  local gone = {}
  for i, hold in ipairs(due) do
    do_end(chain(hold.node), hold, nil)
    end_hold(hold, 'expired', nil)
    gone[i] = hold.id
  end
  return gone
end

-- _ledger.do_charge: record spend that had no hold
local function do_charge(ch, amounts)
  apply((plan(ch, amounts, false)))
  local map = to_map(amounts)
  for _, m in ipairs(ch) do add(m.spent, map, 1) end
end

-- _ledger.do_close: close one node whose open descendants are closed
local function do_close(rec, parent_chain)
  if #parent_chain > 0 then
    local delta = {}
    for d, limit in pairs(rec.limits) do
      local c = rec.committed[d] or 0
      local x = c - math.max(limit, c) - (rec.carried[d] or 0)
      if x ~= 0 then delta[#delta + 1] = {d, x} end
    end
    rec.carried = {}
    apply((plan(parent_chain, delta, false)))
  end
  rec.closed = true
  rec.closed_at = NOW
end
"""

# Every script that changes the ledger runs its ``main`` under pcall, so a refusal raised
# deep in the accounting comes back as a JSON error the client turns into an exception.
_RUN = r"""
local ok, reply = pcall(main)
if ok then return reply end
if type(reply) == 'table' and reply.allotment then
  return cjson.encode({error = {kind = reply.allotment, what = reply.what}})
end
error(reply)
"""

_OPEN_ROOT = r"""
-- ARGV[6]: {name, limits = {{dim, x}...}, rates, deadline, period, meta}
local function main()
  local spec = cjson.decode(ARGV[6])
  local period = opt(spec.period)
  local rec = find(spec.name)
  if rec == nil then
    rec = new_node(spec, spec.name, nil)
    rec.period = period
    rec.period_start = period and STARTS[period]
    nodes[rec.id] = rec
    later('RPUSH', ROOTS, rec.id)
  elseif rec.parent ~= nil then
    refuse('child', spec.name)
  else  -- _ledger.update_root: the owner's current configuration wins
    rec.limits = to_map(spec.limits)
    rec.rates = spec.rates
    rec.deadline = opt(spec.deadline)
    if period ~= rec.period then
      rec.period = period
      rec.period_start = period and STARTS[period]
    end
    rec.closed = false
    rec.closed_at = nil
    for k, v in pairs(spec.meta) do rec.meta[k] = v end
  end
  flush()
  return snapshot(rec)
end
"""

_OPEN_CHILD = r"""
-- ARGV[6]: {name, parent, limits = {{dim, x}...}, rates, deadline, meta}
local function main()
  local done = replay()
  if done then return done end
  local spec = cjson.decode(ARGV[6])
  local parent_chain = chain(spec.parent)
  roll(parent_chain)
  local parent = parent_chain[1]
  local path = parent.path .. '/' .. spec.name
  local id, n = path, 1
  while redis.call('EXISTS', key('node', id)) == 1 do
    n = n + 1
    id = path .. '#' .. n
  end
  local rec = new_node(spec, id, parent.id)
  -- _ledger.do_open_child: escrow the child's limits from its ancestors
  local refusal = check_chain(parent_chain)
  local changes
  if refusal == nil then
    changes, refusal = plan(parent_chain, spec.limits, true)
    if refusal ~= nil then parent.refusals = parent.refusals + 1 end
  end
  local reply
  if refusal ~= nil then
    reply = encode({refusal = refusal})
  else
    apply(changes)
    table.insert(children(parent.id), id)
    later('RPUSH', key('children', parent.id), id)
    nodes[id] = rec
    reply = '{"node":' .. encode(rec) .. ',"children":[]}'
  end
  answer(reply)
  flush()
  return reply
end
"""

_RESERVE = r"""
-- ARGV[6]: node, [7]: hold id, [8]: {{dim, x}...}, [9]: expires_at or ''
local function main()
  local node_id, hold_id = ARGV[6], ARGV[7]
  local existing = redis.call('GET', key('hold', hold_id))
  if existing then
    if unpack_record(existing).op == OP then return '{"admitted":true}' end  -- our retry
    refuse('in_use', hold_id)
  end
  local done = replay()
  if done then return done end
  local ordered = cjson.decode(ARGV[8])
  local ch = chain(node_id)
  roll(ch)
  local hold = {
    id = hold_id, node = node_id, amounts = to_map(ordered), created_at = NOW,
    expires_at = tonumber(ARGV[9]), state = 'open', op = OP,
  }
  local refusal = do_reserve(ch, hold, ordered)
  if refusal ~= nil and refusal.kind == 'limit' and #sweep() > 0 then
    ch[1].refusals = ch[1].refusals - 1  -- the retry decides; count one refusal at most
    refusal = do_reserve(ch, hold, ordered)
  end
  local reply
  if refusal ~= nil then
    reply = answer(encode({refusal = refusal}), 60)  -- only counters depend on it
  else
    reply = '{"admitted":true}'
  end
  flush()
  if refusal == nil then  -- the accounting is done and written: now the hold itself
    if hold.expires_at then
      hold.seq = redis.call('INCR', key('seq', 'holds'))
      redis.call('ZADD', EXPIRY, ARGV[9], hold_id)
    end
    redis.call('SET', key('hold', hold_id), pack_record(hold))
  end
  return reply
end
"""

_SETTLE = r"""
-- ARGV[6]: hold id, [7]: {{dim, x}...}
local function main()
  local packed = redis.call('GET', key('hold', ARGV[6]))
  if not packed then return '{"status":"unknown"}' end
  local hold = unpack_record(packed)
  if hold.state ~= 'open' then
    if hold.state == 'settled' and hold.ended_by == OP then  -- our retry: same answer
      return encode({status = 'settled', node = hold.node, overrun = hold.result})
    end
    return encode({status = 'ended', node = hold.node})
  end
  local ch = chain(hold.node)
  roll(ch)
  local overrun = do_end(ch, hold, to_map(cjson.decode(ARGV[7])))
  end_hold(hold, 'settled', overrun)
  flush()
  return encode({status = 'settled', node = hold.node, overrun = overrun})
end
"""

_RELEASE = r"""
-- ARGV[6]: hold id
local function main()
  local packed = redis.call('GET', key('hold', ARGV[6]))
  if not packed then return '{"released":false}' end
  local hold = unpack_record(packed)
  if hold.state ~= 'open' then
    local ours = hold.state == 'released' and hold.ended_by == OP
    return ours and '{"released":true}' or '{"released":false}'
  end
  do_end(chain(hold.node), hold, nil)
  end_hold(hold, 'released', nil)
  flush()
  return '{"released":true}'
end
"""

_CHARGE = r"""
-- ARGV[6]: node, [7]: {{dim, x}...}
local function main()
  local done = replay()
  if done then return done end
  local ch = chain(ARGV[6])
  roll(ch)
  do_charge(ch, cjson.decode(ARGV[7]))
  answer('{}')
  flush()
  return '{}'
end
"""

_SETTLE_UNRECORDED = r"""
-- ARGV[6]: hold id, [7]: node, [8]: {{dim, x}...}. A hold admitted while the server did
-- not answer (fail-open): if its reservation reached the server after all, settle it as
-- usual; else charge the usage to the node, flagged as a failed-open call.
local function main()
  local done = replay()
  if done then return done end
  local actual = cjson.decode(ARGV[8])
  local packed = redis.call('GET', key('hold', ARGV[6]))
  local hold = packed and unpack_record(packed)
  local reply
  if hold and hold.state == 'open' then
    local ch = chain(hold.node)
    roll(ch)
    local overrun = do_end(ch, hold, to_map(actual))
    end_hold(hold, 'settled', overrun)
    reply = encode({status = 'settled', node = hold.node, overrun = overrun})
  elseif hold and hold.state == 'settled' then
    reply = encode({status = 'ended', node = hold.node})
  else
    actual[#actual + 1] = {'failed_open_calls', 1}
    local ch = chain(ARGV[7])
    roll(ch)
    do_charge(ch, actual)
    reply = encode({status = 'settled', node = ARGV[7], overrun = {}})
  end
  answer(reply)
  flush()
  return reply
end
"""

_CLOSE = r"""
-- ARGV[6]: node
local function close_tree(rec, closed)
  for _, cid in ipairs(children(rec.id)) do
    local c = node(cid)
    if not c.closed then close_tree(c, closed) end
  end
  do_close(rec, rec.parent and chain(rec.parent) or {})
  closed[#closed + 1] = rec.id
end

local function main()
  local done = replay()
  if done then return done end
  local rec = node(ARGV[6])
  local closed = {}
  if not rec.closed then close_tree(rec, closed) end
  local reply = answer(encode(closed, true))
  flush()
  return reply
end
"""

_EXPIRE = r"""
local function main()
  local done = replay()
  if done then return done end
  local reply = answer(encode(sweep(), true))
  flush()
  return reply
end
"""

_TOP_UP = r"""
-- ARGV[6]: root name, [7]: {{dim, x}...}; a dimension the root does not cap stays unlimited
local function main()
  local done = replay()
  if done then return done end
  local rec = node(ARGV[6])
  if rec.parent ~= nil then refuse('child', rec.id) end
  if rec.closed then refuse('closed', rec.id) end
  for _, pair in ipairs(cjson.decode(ARGV[7])) do
    local limit = rec.limits[pair[1]]
    if limit ~= nil then rec.limits[pair[1]] = exact(limit + pair[2]) end
  end
  local reply = answer(snapshot(rec))
  flush()
  return reply
end
"""

# Reads: ARGV[1] prefix; each node comes back as {its JSON, {child ids...}}.
_STATE = r"""
local packed = redis.call('GET', key('node', ARGV[2]))
if not packed then return false end
return {encode(cmsgpack.unpack(packed)), redis.call('LRANGE', key('children', ARGV[2]), 0, -1)}
"""

_TREE = r"""
-- preorder from ARGV[2], children in opening order
local out, stack = {}, {ARGV[2]}
while #stack > 0 do
  local id = table.remove(stack)
  local packed = redis.call('GET', key('node', id))
  if not packed then return false end
  local ids = redis.call('LRANGE', key('children', id), 0, -1)
  out[#out + 1] = {encode(cmsgpack.unpack(packed)), ids}
  for i = #ids, 1, -1 do stack[#stack + 1] = ids[i] end
end
return out
"""

_ROOTS = r"""
local out = {}
for _, id in ipairs(redis.call('LRANGE', ROOTS, 0, -1)) do
  local packed = redis.call('GET', key('node', id))
  if packed then
    local ids = redis.call('LRANGE', key('children', id), 0, -1)
    out[#out + 1] = {encode(cmsgpack.unpack(packed)), ids}
  end
end
return out
"""

_WRITES = {
    "open_root": _OPEN_ROOT,
    "open_child": _OPEN_CHILD,
    "reserve": _RESERVE,
    "settle": _SETTLE,
    "release": _RELEASE,
    "charge": _CHARGE,
    "settle_unrecorded": _SETTLE_UNRECORDED,
    "close": _CLOSE,
    "expire": _EXPIRE,
    "top_up": _TOP_UP,
}
_READS = {"state": _STATE, "tree": _TREE, "roots": _ROOTS}

SCRIPTS = {
    **{name: _COMMON + _ACCOUNTING + body + _RUN for name, body in _WRITES.items()},
    **{name: _COMMON + body for name, body in _READS.items()},
}
"""The Lua source of every operation, by name."""


# -- the client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Queued:
    """An operation to re-send once the server answers (fail-open), with its nonce."""

    script: str
    op: str
    now: float
    args: tuple[str, ...]
    what: str


def _redacted(url: str) -> str:
    """The URL without its password, for messages and tokens."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _option(options: dict[str, str], name: str, url: str) -> str | None:
    value = options.pop(name, None)
    if value is not None and not value:
        raise ConfigurationError(f"redis ledger URL {_redacted(url)!r}: ?{name}= needs a value")
    return value


def _count(value: object, what: str, *, minimum: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < minimum:
        raise ConfigurationError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return int(text)


def _amounts(amounts: Mapping[str, int], what: str) -> str:
    """Ordered ``[[dim, x], ...]`` JSON for a script; refuses what Lua cannot keep exact."""
    out = []
    for dim, x in amounts.items():
        if isinstance(x, bool) or not isinstance(x, int):
            raise InvalidAmount(f"{what}: {dim} must be an integer amount, not {x!r}")
        if abs(x) > MAX_EXACT:
            raise InvalidAmount(
                f"{what}: {dim} = {x} is beyond what the redis ledger keeps exactly "
                f"(2**53 - 1); nothing was changed"
            )
        out.append([str(dim), x])
    return json.dumps(out, separators=(",", ":"))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _state(text: bytes | str, children: list[bytes]) -> NodeState:
    return _node(json.loads(text), [c.decode() for c in children])


def _node(d: Mapping[str, Any], children: list[str]) -> NodeState:
    return NodeState(
        id=d["id"],
        name=d["name"],
        path=d["path"],
        parent=d.get("parent"),
        limits=d["limits"],
        spent=d["spent"],
        held=d["held"],
        committed=d["committed"],
        rates=tuple((str(dim), int(limit), float(w)) for dim, limit, w in d["rates"]),
        deadline=_float(d.get("deadline")),
        period=d.get("period"),
        period_start=_float(d.get("period_start")),
        closed=bool(d["closed"]),
        refusals=int(d["refusals"]),
        open_holds=int(d["open_holds"]),
        created_at=float(d["created_at"]),
        closed_at=_float(d.get("closed_at")),
        children=tuple(children),
        meta={k: json.loads(v) for k, v in d["meta"].items()},
    )


def _refusal(d: Mapping[str, Any]) -> Refusal:
    return Refusal(
        d["kind"],
        d["node"],
        d["path"],
        d["dim"],
        limit=d.get("limit"),
        spent=d.get("spent"),
        held=d.get("held"),
        asked=d.get("asked"),
        retry_after=_float(d.get("retry_after")),
    )


class RedisLedger:
    """Ledger on a Redis server; safe for threads, processes and machines.

    ``redis://[[user]:password@]host[:port][/db][?options]`` (``rediss://`` for TLS). Our
    options: ``prefix`` (key prefix, default ``allotment:``), ``on_error`` (``closed``,
    the default, or ``open``), ``retries`` (re-sends after a connection error or timeout,
    default 2), ``tombstone_ttl`` (seconds, default a day). redis-py reads the others,
    e.g. ``socket_timeout`` (default 5 s) and ``socket_connect_timeout`` (default 2 s).
    Keyword arguments win over the URL; ``client`` supplies a configured ``redis.Redis``.

    Connecting is lazy: a server that is down fails the first operation, not the
    constructor, and the ledger reconnects (and reloads its scripts) by itself.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str | None = None,
        on_error: OnError | None = None,
        retries: int | None = None,
        tombstone_ttl: int | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        if not url.startswith(SCHEMES):
            raise ConfigurationError(
                f"not a redis ledger URL: {_redacted(url)!r}; write redis://host:port/db "
                f"or rediss://host:port/db"
            )
        self.url = url
        self.shown_url = _redacted(url)
        """The URL without its password, as messages name it."""
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        given_prefix = _option(options, "prefix", url)
        given_on_error = _option(options, "on_error", url)
        given_retries = _option(options, "retries", url)
        given_ttl = _option(options, "tombstone_ttl", url)
        self.prefix = prefix if prefix is not None else (given_prefix or DEFAULT_PREFIX)
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigurationError("a redis ledger's key prefix must be a non-empty string")
        policy = on_error if on_error is not None else (given_on_error or "closed")
        if policy not in ("closed", "open"):
            raise ConfigurationError(
                f"on_error must be 'closed' (refuse calls while Redis is unreachable) or "
                f"'open' (admit them, recorded as failed-open), not {policy!r}"
            )
        self.on_error: OnError = "open" if policy == "open" else "closed"
        self.retries = _count(
            retries if retries is not None else (given_retries or DEFAULT_RETRIES),
            "retries",
            minimum=0,
        )
        self.tombstone_ttl = _count(
            tombstone_ttl if tombstone_ttl is not None else (given_ttl or DEFAULT_TOMBSTONE_TTL),
            "tombstone_ttl",
            minimum=1,
        )
        self._owns_client = client is None
        if client is None:
            client = self._connect(urlunsplit(parts._replace(query=urlencode(options))))
        self._client = client
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        host = urlsplit(url)
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self.identity = (
            f"{host.scheme}://{host.hostname or 'localhost'}:{host.port or 6379}/{db}"
            f"?prefix={self.prefix}"
        )
        """What names this ledger in capability tokens: server, database and prefix."""
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pid = -1
        self._op_prefix = ""
        self._ops = itertools.count(1)
        self._starts: tuple[float | None, str] = (None, "")
        """Period starts of the last hour seen, as a script argument."""
        self._pending: deque[_Queued] = deque()
        self._local_holds: OrderedDict[str, str] = OrderedDict()
        self.failed_open = 0
        """Reservations admitted without the server under ``on_error='open'``."""

    def _connect(self, redis_url: str) -> redis.Redis:
        try:
            client = redis.Redis.from_url(
                redis_url,
                socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), self.retries),
            )
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)  # unknown options fail here
        except (TypeError, ValueError) as e:
            raise ConfigurationError(
                f"cannot read redis ledger URL {self.shown_url!r}: {e}; our options are "
                f"{', '.join(_OPTIONS)}, the others go to redis-py"
            ) from e
        return client

    def __repr__(self) -> str:
        return f"RedisLedger({self.shown_url!r})"

    # -- calling the server

    def _op(self) -> str:
        """A nonce for one operation: a re-send of it is recognised and not applied twice."""
        if self._pid != os.getpid():  # a forked child must not reuse its parent's nonces
            with self._lock:
                if self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._op_prefix = os.urandom(8).hex()
                    self._pending.clear()  # the parent re-sends its own
                    self._local_holds.clear()
        return f"{self._op_prefix}.{next(self._ops)}"

    def _period_starts(self, now: float) -> str:
        hour = period_start("hour", now)
        cached_hour, text = self._starts
        if hour != cached_hour:  # every other boundary is an hour boundary too
            text = json.dumps({p: period_start(p, now) for p in _PERIODS})
            self._starts = (hour, text)
        return text

    def _send(self, script: str, op: str, now: float, args: tuple[str, ...], what: str) -> Any:
        """Run one script; its JSON reply, decoded. Raises LedgerError (LedgerUnreachable
        when the server did not answer)."""
        argv = (self.prefix, op, repr(now), self._period_starts(now), str(self.tombstone_ttl))
        reply = self._eval(script, (*argv, *args), what)
        data = json.loads(reply)
        if isinstance(data, dict) and "error" in data:
            self._raise(data["error"], what)
        return data

    def _eval(self, script: str, args: tuple[str, ...], what: str) -> Any:
        try:
            return self._scripts[script](args=args)
        except (redis.AuthenticationError, AuthorizationError) as e:
            raise LedgerError(
                f"the redis ledger {self.shown_url} refused our credentials while trying to "
                f"{what}: {e}; nothing was changed"
            ) from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise LedgerUnreachable(
                f"the redis ledger {self.shown_url} did not answer while trying to {what} "
                f"({e}); no call was admitted. Check the server, or raise socket_timeout"
            ) from e
        except redis.RedisError as e:
            raise LedgerError(
                f"the redis ledger {self.shown_url} failed to {what}: {e}; nothing was changed"
            ) from e

    def _raise(self, error: Mapping[str, Any], what: str) -> NoReturn:
        kind, subject = error.get("kind"), error.get("what")
        if kind == "unknown":
            raise KeyError(subject)
        if kind == "in_use":
            raise LedgerError(f"hold id {subject!r} is already in use")
        if kind == "child":
            raise LedgerError(f"{subject!r} names a child budget, not a root")
        if kind == "closed":
            raise LedgerError(f"budget {subject!r} is closed; it cannot be topped up")
        if kind == "inexact":
            raise LedgerError(
                f"the redis ledger {self.shown_url} refused to {what}: an amount would pass "
                f"2**53 - 1 ({subject}), which it cannot keep exactly; nothing was changed"
            )
        raise LedgerError(f"the redis ledger {self.shown_url} failed to {what}: {error}")

    def _run(self, script: str, what: str, now: float, *args: str) -> Any:
        self._flush_pending()
        return self._send(script, self._op(), now, args, what)

    def _run_or_queue(self, script: str, what: str, now: float, *args: str) -> Any | None:
        """Run an operation that is safe to re-send; under fail-open, queue it (returning
        None) when the server does not answer."""
        op = self._op()
        try:
            self._flush_pending()
            return self._send(script, op, now, args, what)
        except LedgerUnreachable as e:
            if self.on_error == "closed":
                raise
            with self._lock:
                self._pending.append(_Queued(script, op, now, args, what))
            log.warning("%s; failing open: it will be re-sent when the server answers", e)
            return None

    def _flush_pending(self) -> None:
        """Re-send queued operations, oldest first, until one finds the server still away."""
        if not self._pending:
            return
        with self._send_lock:
            while self._pending:
                item = self._pending[0]
                try:
                    self._send(item.script, item.op, item.now, item.args, item.what)
                except LedgerUnreachable:
                    return
                except (LedgerError, KeyError) as e:
                    log.error("dropping a queued operation that failed to %s: %r", item.what, e)
                with self._lock:
                    if self._pending and self._pending[0] is item:
                        self._pending.popleft()

    @property
    def pending(self) -> int:
        """Operations queued under fail-open, to re-send when the server answers."""
        return len(self._pending)

    def flush(self) -> int:
        """Re-send queued operations now; returns how many are still queued."""
        self._flush_pending()
        return len(self._pending)

    # -- the Ledger protocol

    def open(self, spec: NodeSpec, now: float) -> NodeState | Refusal:
        limits = _amounts(spec.limits, f"open budget {spec.name!r}")
        if spec.period is not None and spec.period not in _PERIODS:
            period_start(spec.period, now)  # raises the error every ledger raises
        try:
            meta = {str(k): json.dumps(v) for k, v in spec.meta.items()}
        except (TypeError, ValueError) as e:
            raise LedgerError(
                f"budget {spec.name!r} cannot be stored in the redis ledger: its metadata "
                f"must be JSON-serialisable ({e}); nothing was changed"
            ) from e
        body: dict[str, Any] = {
            "name": spec.name,
            "limits": json.loads(limits),
            "rates": [list(r) for r in spec.rates],
            "deadline": spec.deadline,
            "meta": meta,
        }
        what = f"open budget {spec.name!r}"
        if spec.parent is None:
            body["period"] = spec.period
            reply = self._run("open_root", what, now, json.dumps(body))
        else:
            body["parent"] = spec.parent
            reply = self._run("open_child", what, now, json.dumps(body))
        if "refusal" in reply:
            return _refusal(reply["refusal"])
        return _node(reply["node"], reply["children"])

    def reserve(
        self, node: str, hold: str, amounts: Mapping[str, int], now: float, ttl: float | None
    ) -> Refusal | None:
        what = f"reserve on {node!r}"
        ordered = _amounts(amounts, what)
        expires = "" if ttl is None else repr(now + ttl)
        try:
            reply = self._run("reserve", what, now, node, hold, ordered, expires)
        except LedgerUnreachable as e:
            if self.on_error == "closed":
                raise
            with self._lock:
                self.failed_open += 1
                self._local_holds[hold] = node
                while len(self._local_holds) > _MAX_LOCAL_HOLDS:
                    self._local_holds.popitem(last=False)
            log.warning("%s; failing open: admitted hold %s on %r unrecorded", e, hold, node)
            return None
        return _refusal(reply["refusal"]) if "refusal" in reply else None

    def settle(self, hold: str, amounts: Mapping[str, int], now: float) -> Settled:
        what = f"settle hold {hold!r}"
        ordered = _amounts(amounts, what)
        with self._lock:
            node = self._local_holds.pop(hold, None)
        if node is not None:  # admitted while the server was away: record it as such
            self._run_or_queue("settle_unrecorded", what, now, hold, node, ordered)
            return Settled("settled", node, {})
        reply = self._run_or_queue("settle", what, now, hold, ordered)
        if reply is None:
            return Settled("settled")
        return Settled(reply["status"], reply.get("node"), reply.get("overrun") or {})

    def release(self, hold: str, now: float) -> bool:
        with self._lock:
            local = self._local_holds.pop(hold, None) is not None
        # A hold admitted while the server was away may have reached it after all.
        reply = self._run_or_queue("release", f"release hold {hold!r}", now, hold)
        return local or reply is None or bool(reply["released"])

    def charge(self, node: str, amounts: Mapping[str, int], now: float) -> None:
        what = f"charge {node!r}"
        self._run_or_queue("charge", what, now, node, _amounts(amounts, what))

    @overload
    def close(self) -> None: ...

    @overload
    def close(self, node: str, now: float) -> list[str]: ...

    def close(self, node: str | None = None, now: float | None = None) -> list[str] | None:
        """``close()`` closes this client's connections (the next operation reconnects);
        ``close(node, now)`` closes a budget node (a root by its name), as every ledger
        does."""
        if node is None and now is None:
            if self._owns_client:
                self._client.close()
            return None
        if node is None or now is None:
            raise TypeError("close() takes no arguments, or both node and now")
        reply = self._run_or_queue("close", f"close {node!r}", now, node)
        return [] if reply is None else [str(n) for n in reply]

    def __enter__(self) -> RedisLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state(self, node: str) -> NodeState:
        found = self._read("state", f"read {node!r}", node)
        if found is None:
            raise KeyError(node)
        return _state(found[0], found[1])

    def tree(self, root: str) -> list[NodeState]:
        found = self._read("tree", f"read the tree of {root!r}", root)
        if found is None:
            raise KeyError(root)
        return [_state(text, children) for text, children in found]

    def roots(self) -> list[NodeState]:
        return [_state(text, children) for text, children in self._read("roots", "list roots")]

    def expire(self, now: float) -> list[str]:
        return [str(h) for h in self._run("expire", "expire holds", now)]

    def _read(self, script: str, what: str, *args: str) -> Any:
        self._flush_pending()
        return self._eval(script, (self.prefix, *args), what)

    # -- beyond the protocol

    def read(self, name: str) -> NodeState:
        """A budget by name: a root's name, or any node's path (``KeyError`` if unknown)."""
        return self.state(name)

    def top_up(
        self, root_name: str, amounts: Mapping[str, int], now: float | None = None
    ) -> NodeState:
        """Raise a root's limits by ``amounts`` (ledger units); a dimension it does not cap
        stays unlimited. A child cannot be topped up: its limit is escrow from its parent.
        Reopening the root with other limits (``Budget(..., name=...)``) replaces them."""
        what = f"top up {root_name!r}"
        for dim, x in amounts.items():
            if isinstance(x, int) and not isinstance(x, bool) and x <= 0:
                raise InvalidAmount(f"{what}: {dim} must be a positive amount, not {x}")
        ordered = _amounts(amounts, what)
        at = time.time() if now is None else now
        reply = self._run("top_up", what, at, root_name, ordered)
        return _node(reply["node"], reply["children"])

    def claim(self, name: str, ttl: float) -> bool:
        """Mark ``name`` as used for ``ttl`` seconds, atomically; False if it already was
        (capability tokens use this to be redeemed once)."""
        seconds = max(1, math.ceil(ttl))
        op = self._op().encode()
        try:
            self._flush_pending()
            # SET NX GET answers the value already there: ours when this is a re-send of
            # our own claim whose reply was lost.
            before = self._client.set(
                f"{self.prefix}claim:{name}", op, nx=True, ex=seconds, get=True
            )
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise LedgerUnreachable(
                f"the redis ledger {self.shown_url} did not answer while claiming a token: {e}"
            ) from e
        except redis.RedisError as e:
            raise LedgerError(f"the redis ledger {self.shown_url} failed to claim: {e}") from e
        return before is None or before == op
