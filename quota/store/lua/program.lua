-- Runs one program of quota ops atomically: every op is checked, then all are applied, or none.
-- The semantics are those of quota/store/memory.py; tests run the same suite against both.
-- Work per call is bounded: ids are length-checked before they get here, batches are capped, expired
-- reservations, claims and leases are purged at most PURGE at a time, and a dropped set is moved
-- aside in O(1) and emptied by later calls (W), a slice each.
--
-- KEYS[1]: any key of the app, for routing (every key below shares its {org#app} hash tag).
-- ARGV[1]: now, in milliseconds. ARGV[2..]: ops, each an opcode then its fields (a first op "?"
-- asks for a dry run: every check, nothing applied, the reply as if applied):
--   R key limit window_ms cost exact                              rate (sliding window, or exact log)
--   A owner cap pending_ttl rev_prefix rev_cap rev_value inflight claim_ttl expire_s mdrop n (m f)*n
--                                                                 add members (capped), claimed in flight;
--                                                                 refused ("busy") under a removal's tombstone
--   T inflight ttl_ms symmetric n f*n                             tombstones of a removal in flight (refused,
--                                                                 "busy", while an add of what it removes is)
--   t inflight ttl_ms symmetric n f*n                             the same, unchecked (a removal already made)
--   C inflight n f*n                                              clear them (the removal settled)
--   F inflight n f*n                                              confirm claims (the upstream said 2xx);
--                                                                 applied first, even when a check refuses
--   U owner rev_prefix rev_value inflight n (m f)*n               undo claims (the upstream failed)
--   X owner rev_prefix rev_value n m1..mn                         remove members
--   D owner trash                                                 drop an owner's set (moved aside)
--   W trash rev_prefix value batch                                drain a dropped set
--   B owner placeholder member rev_prefix rev_value               bind a reservation (and, with rev_prefix,
--                                                                 add rev_value to the member's own set)
--   N zkey ttl_ms n m*n                                           renew live reservations or claims
--   O online peak month conn ttl_ms cap share_bp mau_last mau_this recheck   hold a connection lease
--                                    (recheck 1: a lease held must fit among the others too)
--   Z zkey member                                                 release a lease
-- Claims: hash `inflight` (pair -> adds in flight; "s:"..pair when the member stands on its own:
-- it was there before, or a claimant succeeded) and sorted set `inflight:due` (pair -> deadline).
-- Returns {1, online, remaining, nrates, (remaining, reset_ms)*, nadds, (k, size, member*k)*} when
-- applied, or {0, op_index, kind, used, cap, a, b, c, who} when refused (rate: a,b,c = prev, cur,
-- elapsed; rlog: a = retry ms; owner: a = room left; member: who).

local now = tonumber(ARGV[1])
-- Arguments of redis.call go as strings: a Lua number is formatted there with sprintf's %.17g, which
-- cost more than the call itself. So what the caller sent is passed on as sent, and a computed
-- whole number is formatted as one (int).
local NOW = ARGV[1]
local PURGE = "256"
local NAMES = 1000
local function int(x)
  return string.format("%d", x)
end

-- Same escaping as quota/keys.py: percent-encode every byte outside [A-Za-z0-9_.-].
local function escape(s)
  return (string.gsub(s, "[^%w_%.%-]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local ops = {}
local i = 2
local n_args = #ARGV
local dry = ARGV[2] == "?"
if dry then i = 3 end
-- Each op is built by one constructor that names every field it will hold, so that it is sized once
-- rather than rehashed as fields are added.
local function list(first, n, step)
  local out = {}
  for j = 0, n - 1 do out[j + 1] = ARGV[first + j * step] end
  return out
end
while i <= n_args do
  local code = ARGV[i]
  local op
  if code == "R" then
    op = {code = code, key = ARGV[i+1], limit = tonumber(ARGV[i+2]), window = tonumber(ARGV[i+3]),
          cost = tonumber(ARGV[i+4]), charge = ARGV[i+4], exact = ARGV[i+5] == "1", current = false,
          used = 0}
    i = i + 6
  elseif code == "A" then
    local n = tonumber(ARGV[i+11])
    op = {code = code, owner = ARGV[i+1], cap = tonumber(ARGV[i+2]), pending = tonumber(ARGV[i+3]),
          rprefix = ARGV[i+4], rcap = tonumber(ARGV[i+5]), rvalue = ARGV[i+6], inflight = ARGV[i+7],
          claim = tonumber(ARGV[i+8]), expire = tonumber(ARGV[i+9]), mdrop = ARGV[i+10],
          members = list(i + 12, n, 2), fields = list(i + 13, n, 2), new = false, size = 0}
    i = i + 12 + 2 * n
  elseif code == "T" or code == "t" then
    local n = tonumber(ARGV[i+4])
    op = {code = code, inflight = ARGV[i+1], ttl = tonumber(ARGV[i+2]), symmetric = ARGV[i+3] == "1",
          fields = list(i + 5, n, 1)}
    i = i + 5 + n
  elseif code == "C" or code == "F" then
    local n = tonumber(ARGV[i+2])
    op = {code = code, inflight = ARGV[i+1], fields = list(i + 3, n, 1)}
    i = i + 3 + n
  elseif code == "U" then
    local n = tonumber(ARGV[i+5])
    op = {code = code, owner = ARGV[i+1], rprefix = ARGV[i+2], rvalue = ARGV[i+3], inflight = ARGV[i+4],
          members = list(i + 6, n, 2), fields = list(i + 7, n, 2)}
    i = i + 6 + 2 * n
  elseif code == "X" then
    local n = tonumber(ARGV[i+4])
    op = {code = code, owner = ARGV[i+1], rprefix = ARGV[i+2], rvalue = ARGV[i+3], members = list(i + 5, n, 1)}
    i = i + 5 + n
  elseif code == "D" then
    op = {code = code, owner = ARGV[i+1], trash = ARGV[i+2]}
    i = i + 3
  elseif code == "W" then
    op = {code = code, trash = ARGV[i+1], rprefix = ARGV[i+2], value = ARGV[i+3], batch = tonumber(ARGV[i+4])}
    i = i + 5
  elseif code == "B" then
    op = {code = code, owner = ARGV[i+1], placeholder = ARGV[i+2], member = ARGV[i+3], rprefix = ARGV[i+4],
          rvalue = ARGV[i+5]}
    i = i + 6
  elseif code == "N" then
    local n = tonumber(ARGV[i+3])
    op = {code = code, key = ARGV[i+1], ttl = tonumber(ARGV[i+2]), members = list(i + 4, n, 1)}
    i = i + 4 + n
  elseif code == "O" then
    op = {code = code, online = ARGV[i+1], peak = ARGV[i+2], month = ARGV[i+3], conn = ARGV[i+4],
          ttl = tonumber(ARGV[i+5]), cap = tonumber(ARGV[i+6]), share = tonumber(ARGV[i+7]),
          mau_last = ARGV[i+8], mau_this = ARGV[i+9], recheck = ARGV[i+10] == "1"}
    i = i + 11
  elseif code == "Z" then
    op = {code = code, key = ARGV[i+1], member = ARGV[i+2]}
    i = i + 3
  else
    return redis.error_reply("quota: unknown opcode " .. tostring(code))
  end
  ops[#ops + 1] = op
end

-- The window's two counters in one call; the current one's name is kept for the apply.
local function window(op)
  local index = math.floor(now / op.window)
  local elapsed = now - index * op.window
  op.current = op.key .. ":" .. int(index)
  local got = redis.call("MGET", op.key .. ":" .. int(index - 1), op.current)
  return elapsed, tonumber(got[1]) or 0, tonumber(got[2]) or 0
end

local function weighted(prev, cur, elapsed, w)
  return math.floor(prev * (w - elapsed) / w) + cur
end

-- Expired members of a sorted set of deadlines, at most PURGE per call; returns them.
local function purge(zkey)
  local expired = redis.call("ZRANGEBYSCORE", zkey, "-inf", NOW, "LIMIT", "0", PURGE)
  if #expired > 0 then redis.call("ZREM", zkey, unpack(expired)) end
  return expired
end

local function live(zkey)
  purge(zkey)
  return redis.call("ZCOUNT", zkey, "(" .. NOW, "+inf")
end

local function lease_cap(op)
  if op.share == 0 then return op.cap end
  local mau = math.max(redis.call("SCARD", op.mau_last), redis.call("SCARD", op.mau_this))
  return math.max(op.cap, math.floor(op.share * mau / 10000))
end

-- Confirms first, whatever the checks decide: they record answers an upstream already gave, so a
-- process may send them with its next program for the app (even one that is refused), not alone.
local function confirm(op)
  for _, f in ipairs(op.fields) do
    local held = tonumber(redis.call("HGET", op.inflight, f))
    if held == nil then
      -- Lapsed, or undone: nothing is left to confirm.
    elseif held <= 1 then
      redis.call("HDEL", op.inflight, f, "s:" .. f)
      redis.call("ZREM", op.inflight .. ":due", f)
    else
      redis.call("HSET", op.inflight, f, int(held - 1), "s:" .. f, "1")
    end
  end
end
if not dry then
  for _, op in ipairs(ops) do
    if op.code == "F" then confirm(op) end
  end
end

-- Check every op; nothing is written until all pass.
local rates = {}
for index, op in ipairs(ops) do
  local code = op.code
  if code == "R" then
    if op.exact then
      local log = op.key .. ":log"
      -- A hit at t counts while now <= t + window.
      redis.call("ZREMRANGEBYSCORE", log, "-inf", "(" .. (now - op.window))
      local used = redis.call("ZCARD", log)
      if used + op.cost > op.limit then
        local retry = 2 * op.window
        if op.cost <= op.limit then
          local nth = used + op.cost - op.limit - 1
          local hit = redis.call("ZRANGE", log, nth, nth, "WITHSCORES")
          retry = math.max(1, tonumber(hit[2]) + op.window + 1 - now)
        end
        return {0, index - 1, "rlog", used, op.limit, retry, 0, 0, ""}
      end
      local oldest = redis.call("ZRANGE", log, 0, 0, "WITHSCORES")
      local first = tonumber(oldest[2]) or now
      rates[#rates + 1] = op.limit - used - op.cost
      rates[#rates + 1] = first + op.window + 1 - now
      op.used = used
    else
      local elapsed, prev, cur = window(op)
      local used = weighted(prev, cur, elapsed, op.window)
      if used + op.cost > op.limit then
        return {0, index - 1, "rate", used, op.limit, prev, cur, elapsed, ""}
      end
      rates[#rates + 1] = op.limit - used - op.cost
      rates[#rates + 1] = op.window - elapsed
    end
  elseif code == "A" then
    if op.pending > 0 then
      for _, placeholder in ipairs(purge(op.owner .. ":pending")) do
        redis.call("SREM", op.owner, placeholder)
      end
    end
    if op.inflight ~= "" then
      local lapsed = purge(op.inflight .. ":due")
      for _, f in ipairs(lapsed) do redis.call("HDEL", op.inflight, f, "s:" .. f) end
      -- Every tombstone that would make this add wait, asked for in one call; a batch too large
      -- for one unpack (Lua's stack takes fewer than 8,000 values) in calls of NAMES each.
      local names = {"xo:" .. escape(op.rvalue)}
      for j, m in ipairs(op.members) do
        names[2 * j] = "rm:" .. op.fields[j]
        names[2 * j + 1] = op.mdrop .. ":" .. escape(m)
      end
      local held = {}
      for first = 1, #names, NAMES do
        local got = redis.call("HMGET", op.inflight, unpack(names, first, math.min(first + NAMES - 1, #names)))
        for k = 1, #got do held[first + k - 1] = got[k] end
      end
      if held[1] then
        return {0, index - 1, "busy", 0, 0, 0, 0, 0, op.members[1] or ""}
      end
      for j, m in ipairs(op.members) do
        if held[2 * j] or held[2 * j + 1] then
          return {0, index - 1, "busy", 0, 0, 0, 0, 0, m}
        end
      end
    end
    local size = redis.call("SCARD", op.owner)
    local new = {}
    for _, m in ipairs(op.members) do
      if redis.call("SISMEMBER", op.owner, m) == 0 then new[#new + 1] = m end
    end
    if op.cap >= 0 and size + #new > op.cap then
      return {0, index - 1, "owner", size, op.cap, math.max(0, op.cap - size), 0, 0, ""}
    end
    op.new, op.size = new, size
    if op.rprefix ~= "" and op.rcap >= 0 then
      for _, m in ipairs(new) do
        local rkey = op.rprefix .. escape(m)
        local rsize = redis.call("SCARD", rkey)
        if redis.call("SISMEMBER", rkey, op.rvalue) == 0 and rsize + 1 > op.rcap then
          -- A room's creation its creator reserved here and never settled: dropped once expired,
          -- on the refusing path alone (a join costs nothing more).
          for _, placeholder in ipairs(purge(rkey .. ":pending")) do redis.call("SREM", rkey, placeholder) end
          rsize = redis.call("SCARD", rkey)
          if rsize + 1 > op.rcap then
            return {0, index - 1, "member", rsize, op.rcap, 0, 0, 0, m}
          end
        end
      end
    end
  elseif code == "T" then
    -- A claim whose request died unanswered must not hold removals for ever.
    for _, f in ipairs(purge(op.inflight .. ":due")) do redis.call("HDEL", op.inflight, f, "s:" .. f) end
    -- The hash's fields, read once for all the sets this op drops (nothing changes it while checking).
    local fields = nil
    for _, f in ipairs(op.fields) do
      local kind, what = string.sub(f, 1, 2), string.sub(f, 4)
      if kind == "rm" then
        if redis.call("HEXISTS", op.inflight, what) == 1 then
          return {0, index - 1, "busy", 0, 0, 0, 0, 0, what}
        end
      else
        -- A whole set is dropped: no add of a pair naming the entity may be in flight.
        if fields == nil then fields = redis.call("HKEYS", op.inflight) end
        for _, g in ipairs(fields) do
          if not string.find(g, ":", 1, true) then
            local bar = string.find(g, "|", 1, true)
            local left, right = string.sub(g, 1, bar - 1), string.sub(g, bar + 1)
            if (kind == "xo" and left == what) or (kind == "xm" and right == what) or (op.symmetric and right == what) then
              return {0, index - 1, "busy", 0, 0, 0, 0, 0, what}
            end
          end
        end
      end
    end
  elseif code == "O" then
    local online = live(op.online)
    local cap = lease_cap(op)
    local held = redis.call("ZSCORE", op.online, op.conn)
    if op.recheck then
      -- Counted among the others: its own live lease vouches for nothing.
      if held and tonumber(held) > now then online = online - 1 end
      if cap >= 0 and online >= cap then
        return {0, index - 1, "online", online, cap, 0, 0, 0, ""}
      end
    elseif cap >= 0 and not held and online >= cap then
      return {0, index - 1, "online", online, cap, 0, 0, 0, ""}
    end
  end
end

local adds = {}
local online, remaining = 0, 0
if dry then
  for _, op in ipairs(ops) do
    if op.code == "A" then adds[#adds + 1] = {op.new, op.size + #op.new} end
  end
  ops = {}
end

-- Apply.
for _, op in ipairs(ops) do
  local code = op.code
  if code == "R" then
    if op.exact then
      local log = op.key .. ":log"
      -- Each hit a name of its own: hits dated alike by two workers, landing out of order, would
      -- share `now:count` and one overwrite the other (a hit lost, one request too many later).
      local seq = redis.call("INCRBY", log .. ":n", op.cost)
      for j = 1, op.cost do redis.call("ZADD", log, NOW, NOW .. ":" .. int(seq - op.cost + j)) end
      redis.call("PEXPIRE", log, op.window + 1000)
      redis.call("PEXPIRE", log .. ":n", op.window + 1000)
    else
      -- A counter is dated when it is made (it was 0 before this hit), not again on every hit.
      if redis.call("INCRBY", op.current, op.charge) == op.cost then
        redis.call("PEXPIRE", op.current, op.window * 2 + 1000)
      end
    end
  elseif code == "A" then
    local claimed = {}
    for j, m in ipairs(op.members) do
      local f = op.fields[j]
      if redis.call("SADD", op.owner, m) == 1 then
        if op.rprefix ~= "" then redis.call("SADD", op.rprefix .. escape(m), op.rvalue) end
        if op.pending > 0 then redis.call("ZADD", op.owner .. ":pending", int(now + op.pending), m) end
        if op.inflight ~= "" then
          redis.call("HSET", op.inflight, f, "1")
          redis.call("HDEL", op.inflight, "s:" .. f)
          redis.call("ZADD", op.inflight .. ":due", int(now + op.claim), f)
        end
        claimed[#claimed + 1] = m
      elseif op.inflight ~= "" then
        -- Already there: claimed too (a removal must wait for this add), and standing on its own
        -- unless another add in flight brought it.
        if redis.call("HINCRBY", op.inflight, f, "1") == 1 then redis.call("HSET", op.inflight, "s:" .. f, "1") end
        redis.call("ZADD", op.inflight .. ":due", int(now + op.claim), f)
        claimed[#claimed + 1] = m
      end
    end
    if op.expire > 0 then redis.call("EXPIRE", op.owner, op.expire) end
    adds[#adds + 1] = {claimed, redis.call("SCARD", op.owner)}
  elseif code == "U" then
    for j, m in ipairs(op.members) do
      local gone = true
      if op.inflight ~= "" then
        gone = false
        local f = op.fields[j]
        if redis.call("HEXISTS", op.inflight, f) == 1 and redis.call("HINCRBY", op.inflight, f, "-1") <= 0 then
          gone = redis.call("HEXISTS", op.inflight, "s:" .. f) == 0
          redis.call("HDEL", op.inflight, f, "s:" .. f)
          redis.call("ZREM", op.inflight .. ":due", f)
        end
      else
        redis.call("ZREM", op.owner .. ":pending", m)
      end
      if gone then
        redis.call("SREM", op.owner, m)
        if op.rprefix ~= "" then redis.call("SREM", op.rprefix .. escape(m), op.rvalue) end
      end
    end
  elseif code == "F" then
    -- Applied before the checks (below).
  elseif code == "T" or code == "t" then
    for _, f in ipairs(op.fields) do
      redis.call("HINCRBY", op.inflight, f, "1")
      redis.call("ZADD", op.inflight .. ":due", int(now + op.ttl), f)
    end
  elseif code == "C" then
    for _, f in ipairs(op.fields) do
      if redis.call("HINCRBY", op.inflight, f, "-1") <= 0 then
        redis.call("HDEL", op.inflight, f)
        redis.call("ZREM", op.inflight .. ":due", f)
      end
    end
  elseif code == "X" then
    for _, m in ipairs(op.members) do
      redis.call("SREM", op.owner, m)
      if op.rprefix ~= "" then redis.call("SREM", op.rprefix .. escape(m), op.rvalue) end
    end
  elseif code == "D" then
    if redis.call("EXISTS", op.owner) == 1 then redis.call("RENAME", op.owner, op.trash) end
  elseif code == "W" then
    local taken = redis.call("SPOP", op.trash, op.batch)
    -- A relation with no member side has nothing to take out: a key is never built from "" alone.
    if op.rprefix ~= "" then
      for _, m in ipairs(taken) do
        redis.call("SREM", op.rprefix .. escape(m), op.value)
      end
    end
    remaining = redis.call("SCARD", op.trash)
  elseif code == "B" then
    redis.call("ZREM", op.owner .. ":pending", op.placeholder)
    if op.member ~= op.placeholder then
      redis.call("SREM", op.owner, op.placeholder)
      redis.call("SADD", op.owner, op.member)
      if op.rprefix ~= "" then redis.call("SADD", op.rprefix .. escape(op.member), op.rvalue) end
    end
  elseif code == "N" then
    for _, m in ipairs(op.members) do
      local deadline = tonumber(redis.call("ZSCORE", op.key, m))
      if deadline and deadline > now then redis.call("ZADD", op.key, "XX", int(now + op.ttl), m) end
    end
  elseif code == "O" then
    redis.call("ZADD", op.online, int(now + op.ttl), op.conn)
    online = redis.call("ZCOUNT", op.online, "(" .. NOW, "+inf")
    local peak = tonumber(redis.call("HGET", op.peak, op.month)) or 0
    if online > peak then redis.call("HSET", op.peak, op.month, online) end
  elseif code == "Z" then
    redis.call("ZREM", op.key, op.member)
  end
end

local reply = {1, online, remaining, #rates / 2}
for _, r in ipairs(rates) do reply[#reply + 1] = r end
reply[#reply + 1] = #adds
for _, add in ipairs(adds) do
  reply[#reply + 1] = #add[1]
  reply[#reply + 1] = add[2]
  for _, m in ipairs(add[1]) do reply[#reply + 1] = m end
end
return reply
