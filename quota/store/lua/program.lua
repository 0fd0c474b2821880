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

-- Cost: Redis runs this script on every request, so it is written for Lua 5.1's interpreter. An op's
-- fields are read from ARGV where they lie (no table built per op); a number is converted where it is
-- used, by arithmetic (`s + 0`: one strtod, where tonumber runs two); helpers exist only where used
-- more than once (each is a closure made on every call); the reply is built as the checks go.
local call = redis.call
local argv = ARGV
local now = argv[1] + 0
-- Arguments of redis.call go as strings: a Lua number is formatted there with sprintf's %.17g, which
-- cost more than the call itself. So what the caller sent is passed on as sent, and a computed
-- whole number is formatted as one (int).
local NOW = argv[1]
local PURGE = "256"
local NAMES = 1000
local format = string.format
local function int(x)
  return format("%d", x)
end

-- Same escaping as quota/keys.py: percent-encode every byte outside [A-Za-z0-9_.-]. Ids are almost
-- always clean, and a search that finds nothing costs less than a substitution that changes nothing.
local UNSAFE = "[^%w_%.%-]"
local function hex(c)
  return format("%%%02X", string.byte(c))
end
local function escape(s)
  if not string.find(s, UNSAFE) then return s end
  return (string.gsub(s, UNSAFE, hex))
end

-- Expired members of a sorted set of deadlines, at most PURGE per call; returns them.
local function purge(zkey)
  local expired = call("ZRANGEBYSCORE", zkey, "-inf", NOW, "LIMIT", "0", PURGE)
  if #expired > 0 then call("ZREM", zkey, unpack(expired)) end
  return expired
end

-- The ops: each one's opcode and where it starts in ARGV.
local codes, at, n_ops = {}, {}, 0
local i = 2
local n_args = #argv
local dry = argv[2] == "?"
if dry then i = 3 end
while i <= n_args do
  local code = argv[i]
  n_ops = n_ops + 1
  codes[n_ops], at[n_ops] = code, i
  if code == "R" then i = i + 6
  elseif code == "A" then i = i + 12 + 2 * argv[i+11]
  elseif code == "T" or code == "t" then i = i + 5 + argv[i+4]
  elseif code == "C" or code == "F" then i = i + 3 + argv[i+2]
  elseif code == "U" then i = i + 6 + 2 * argv[i+5]
  elseif code == "X" then i = i + 5 + argv[i+4]
  elseif code == "D" then i = i + 3
  elseif code == "W" then i = i + 5
  elseif code == "B" then i = i + 6
  elseif code == "N" then i = i + 4 + argv[i+3]
  elseif code == "O" then i = i + 11
  elseif code == "Z" then i = i + 3
  else
    return redis.error_reply("quota: unknown opcode " .. tostring(code))
  end
end

-- Confirms first, whatever the checks decide: they record answers an upstream already gave, so a
-- process may send them with its next program for the app (even one that is refused), not alone.
if not dry then
  for k = 1, n_ops do
    if codes[k] == "F" then
      local p = at[k]
      local inflight = argv[p+1]
      for q = p + 3, p + 2 + argv[p+2] do
        local f = argv[q]
        local held = call("HGET", inflight, f)
        if not held then
          -- Lapsed, or undone: nothing is left to confirm.
        elseif held + 0 <= 1 then
          call("HDEL", inflight, f, "s:" .. f)
          call("ZREM", inflight .. ":due", f)
        else
          call("HSET", inflight, f, int(held - 1), "s:" .. f, "1")
        end
      end
    end
  end
end

-- Check every op; nothing is written until all pass. What the apply needs of a check is kept by op
-- index in `current` (a sliding rate's counter); the reply's rates are written as they are checked.
local reply = {1, 0, 0, 0}
local current = {}
local dry_adds = dry and {} or nil
for k = 1, n_ops do
  local code, p = codes[k], at[k]
  if code == "R" then
    local key, limit, w, cost = argv[p+1], argv[p+2] + 0, argv[p+3] + 0, argv[p+4] + 0
    if argv[p+5] == "1" then
      local log = key .. ":log"
      -- A hit at t counts while now <= t + window.
      call("ZREMRANGEBYSCORE", log, "-inf", "(" .. int(now - w))
      local used = call("ZCARD", log)
      if used + cost > limit then
        local retry = 2 * w
        if cost <= limit then
          local nth = used + cost - limit - 1
          local hit = call("ZRANGE", log, nth, nth, "WITHSCORES")
          retry = math.max(1, tonumber(hit[2]) + w + 1 - now)
        end
        return {0, k - 1, "rlog", used, limit, retry, 0, 0, ""}
      end
      local oldest = call("ZRANGE", log, 0, 0, "WITHSCORES")
      local first = tonumber(oldest[2]) or now
      reply[#reply + 1] = limit - used - cost
      reply[#reply + 1] = first + w + 1 - now
    else
      -- The window's two counters in one call; the current one's name is kept for the apply.
      local elapsed = now % w
      local index = (now - elapsed) / w
      local name = key .. ":" .. int(index)
      local got = call("MGET", key .. ":" .. int(index - 1), name)
      local prev, cur = got[1] and got[1] + 0 or 0, got[2] and got[2] + 0 or 0
      local used = math.floor(prev * (w - elapsed) / w) + cur
      if used + cost > limit then
        return {0, k - 1, "rate", used, limit, prev, cur, elapsed, ""}
      end
      current[k] = name
      reply[#reply + 1] = limit - used - cost
      reply[#reply + 1] = w - elapsed
    end
    reply[4] = reply[4] + 1
  elseif code == "A" then
    local owner, cap, pending = argv[p+1], argv[p+2] + 0, argv[p+3] + 0
    local rprefix, rcap, rvalue, inflight = argv[p+4], argv[p+5] + 0, argv[p+6], argv[p+7]
    -- Member j (from 0) at first + 2j, its claim's field after it.
    local first, last = p + 12, p + 10 + 2 * argv[p+11]
    if pending > 0 then
      for _, placeholder in ipairs(purge(owner .. ":pending")) do
        call("SREM", owner, placeholder)
      end
    end
    if inflight ~= "" then
      local lapsed = purge(inflight .. ":due")
      for _, f in ipairs(lapsed) do call("HDEL", inflight, f, "s:" .. f) end
      -- Every tombstone that would make this add wait, asked for in one call; a batch too large
      -- for one unpack (Lua's stack takes fewer than 8,000 values) in calls of NAMES each.
      local mdrop = argv[p+10] .. ":"
      local names = {"xo:" .. escape(rvalue)}
      for q = first, last, 2 do
        names[#names + 1] = "rm:" .. argv[q+1]
        names[#names + 1] = mdrop .. escape(argv[q])
      end
      local held = {}
      for from = 1, #names, NAMES do
        local got = call("HMGET", inflight, unpack(names, from, math.min(from + NAMES - 1, #names)))
        for g = 1, #got do held[from + g - 1] = got[g] end
      end
      if held[1] then
        return {0, k - 1, "busy", 0, 0, 0, 0, 0, first <= last and argv[first] or ""}
      end
      for q = first, last, 2 do
        local j = q - first
        if held[j + 2] or held[j + 3] then
          return {0, k - 1, "busy", 0, 0, 0, 0, 0, argv[q]}
        end
      end
    end
    local size = call("SCARD", owner)
    local new = {}
    for q = first, last, 2 do
      if call("SISMEMBER", owner, argv[q]) == 0 then new[#new + 1] = argv[q] end
    end
    if cap >= 0 and size + #new > cap then
      return {0, k - 1, "owner", size, cap, math.max(0, cap - size), 0, 0, ""}
    end
    if dry then
      dry_adds[#dry_adds + 1] = new
      dry_adds[#dry_adds + 1] = size + #new
    end
    if rprefix ~= "" and rcap >= 0 then
      for _, m in ipairs(new) do
        local rkey = rprefix .. escape(m)
        local rsize = call("SCARD", rkey)
        if rsize + 1 > rcap and call("SISMEMBER", rkey, rvalue) == 0 then
          -- A room's creation its creator reserved here and never settled: dropped once expired,
          -- on the refusing path alone (a join costs nothing more).
          for _, placeholder in ipairs(purge(rkey .. ":pending")) do call("SREM", rkey, placeholder) end
          rsize = call("SCARD", rkey)
          if rsize + 1 > rcap then
            return {0, k - 1, "member", rsize, rcap, 0, 0, 0, m}
          end
        end
      end
    end
  elseif code == "T" then
    local inflight, symmetric = argv[p+1], argv[p+3] == "1"
    -- A claim whose request died unanswered must not hold removals for ever.
    for _, f in ipairs(purge(inflight .. ":due")) do call("HDEL", inflight, f, "s:" .. f) end
    -- The hash's fields, read once for all the sets this op drops (nothing changes it while checking).
    local fields = nil
    for q = p + 5, p + 4 + argv[p+4] do
      local f = argv[q]
      local kind, what = string.sub(f, 1, 2), string.sub(f, 4)
      if kind == "rm" then
        if call("HEXISTS", inflight, what) == 1 then
          return {0, k - 1, "busy", 0, 0, 0, 0, 0, what}
        end
      else
        -- A whole set is dropped: no add of a pair naming the entity may be in flight.
        if fields == nil then fields = call("HKEYS", inflight) end
        for _, g in ipairs(fields) do
          if not string.find(g, ":", 1, true) then
            local bar = string.find(g, "|", 1, true)
            local left, right = string.sub(g, 1, bar - 1), string.sub(g, bar + 1)
            if (kind == "xo" and left == what) or (kind == "xm" and right == what) or (symmetric and right == what) then
              return {0, k - 1, "busy", 0, 0, 0, 0, 0, what}
            end
          end
        end
      end
    end
  elseif code == "O" then
    local key, conn, cap, share = argv[p+1], argv[p+4], argv[p+6] + 0, argv[p+7] + 0
    purge(key)
    local online = call("ZCOUNT", key, "(" .. NOW, "+inf")
    if share ~= 0 then
      local mau = math.max(call("SCARD", argv[p+8]), call("SCARD", argv[p+9]))
      cap = math.max(cap, math.floor(share * mau / 10000))
    end
    local held = call("ZSCORE", key, conn)
    if argv[p+10] == "1" then
      -- Counted among the others: its own live lease vouches for nothing.
      if held and tonumber(held) > now then online = online - 1 end
      if cap >= 0 and online >= cap then
        return {0, k - 1, "online", online, cap, 0, 0, 0, ""}
      end
    elseif cap >= 0 and not held and online >= cap then
      return {0, k - 1, "online", online, cap, 0, 0, 0, ""}
    end
  end
end

-- The reply's adds: their count, then each one's count, size and members.
local n_adds = #reply + 1
reply[n_adds] = 0
if dry then
  for d = 1, #dry_adds, 2 do
    local new = dry_adds[d]
    reply[#reply + 1] = #new
    reply[#reply + 1] = dry_adds[d + 1]
    for _, m in ipairs(new) do reply[#reply + 1] = m end
  end
  reply[n_adds] = #dry_adds / 2
  return reply
end

-- Apply.
for k = 1, n_ops do
  local code, p = codes[k], at[k]
  if code == "R" then
    local key, w, charge = argv[p+1], argv[p+3], argv[p+4]
    if argv[p+5] == "1" then
      local log = key .. ":log"
      local cost = charge + 0
      -- Each hit a name of its own: hits dated alike by two workers, landing out of order, would
      -- share `now:count` and one overwrite the other (a hit lost, one request too many later).
      local seq = call("INCRBY", log .. ":n", charge)
      for j = 1, cost do call("ZADD", log, NOW, NOW .. ":" .. int(seq - cost + j)) end
      local ttl = int(w + 1000)
      call("PEXPIRE", log, ttl)
      call("PEXPIRE", log .. ":n", ttl)
    else
      -- A counter is dated when it is made (it was 0 before this hit), not again on every hit.
      if call("INCRBY", current[k], charge) == charge + 0 then
        call("PEXPIRE", current[k], int(w * 2 + 1000))
      end
    end
  elseif code == "A" then
    local owner, pending, rprefix, rvalue = argv[p+1], argv[p+3] + 0, argv[p+4], argv[p+6]
    local inflight, claim, expire = argv[p+7], argv[p+8] + 0, argv[p+9] + 0
    local head = #reply + 1
    reply[head], reply[head + 1] = 0, 0
    for q = p + 12, p + 10 + 2 * argv[p+11], 2 do
      local m, f = argv[q], argv[q+1]
      if call("SADD", owner, m) == 1 then
        if rprefix ~= "" then call("SADD", rprefix .. escape(m), rvalue) end
        if pending > 0 then call("ZADD", owner .. ":pending", int(now + pending), m) end
        if inflight ~= "" then
          call("HSET", inflight, f, "1")
          call("HDEL", inflight, "s:" .. f)
          call("ZADD", inflight .. ":due", int(now + claim), f)
        end
        reply[#reply + 1] = m
      elseif inflight ~= "" then
        -- Already there: claimed too (a removal must wait for this add), and standing on its own
        -- unless another add in flight brought it.
        if call("HINCRBY", inflight, f, "1") == 1 then call("HSET", inflight, "s:" .. f, "1") end
        call("ZADD", inflight .. ":due", int(now + claim), f)
        reply[#reply + 1] = m
      end
    end
    if expire > 0 then call("EXPIRE", owner, argv[p+9]) end
    reply[head] = #reply - head - 1
    reply[head + 1] = call("SCARD", owner)
    reply[n_adds] = reply[n_adds] + 1
  elseif code == "U" then
    local owner, rprefix, rvalue, inflight = argv[p+1], argv[p+2], argv[p+3], argv[p+4]
    for q = p + 6, p + 4 + 2 * argv[p+5], 2 do
      local m = argv[q]
      local gone = true
      if inflight ~= "" then
        gone = false
        local f = argv[q+1]
        if call("HEXISTS", inflight, f) == 1 and call("HINCRBY", inflight, f, "-1") <= 0 then
          gone = call("HEXISTS", inflight, "s:" .. f) == 0
          call("HDEL", inflight, f, "s:" .. f)
          call("ZREM", inflight .. ":due", f)
        end
      else
        call("ZREM", owner .. ":pending", m)
      end
      if gone then
        call("SREM", owner, m)
        if rprefix ~= "" then call("SREM", rprefix .. escape(m), rvalue) end
      end
    end
  elseif code == "F" then
    -- Applied before the checks (above).
  elseif code == "T" or code == "t" then
    local inflight, deadline = argv[p+1], int(now + argv[p+2])
    for q = p + 5, p + 4 + argv[p+4] do
      call("HINCRBY", inflight, argv[q], "1")
      call("ZADD", inflight .. ":due", deadline, argv[q])
    end
  elseif code == "C" then
    local inflight = argv[p+1]
    for q = p + 3, p + 2 + argv[p+2] do
      if call("HINCRBY", inflight, argv[q], "-1") <= 0 then
        call("HDEL", inflight, argv[q])
        call("ZREM", inflight .. ":due", argv[q])
      end
    end
  elseif code == "X" then
    local owner, rprefix, rvalue = argv[p+1], argv[p+2], argv[p+3]
    for q = p + 5, p + 4 + argv[p+4] do
      call("SREM", owner, argv[q])
      if rprefix ~= "" then call("SREM", rprefix .. escape(argv[q]), rvalue) end
    end
  elseif code == "D" then
    if call("EXISTS", argv[p+1]) == 1 then call("RENAME", argv[p+1], argv[p+2]) end
  elseif code == "W" then
    local trash, rprefix, value = argv[p+1], argv[p+2], argv[p+3]
    local taken = call("SPOP", trash, argv[p+4])
    -- A relation with no member side has nothing to take out: a key is never built from "" alone.
    if rprefix ~= "" then
      for _, m in ipairs(taken) do
        call("SREM", rprefix .. escape(m), value)
      end
    end
    reply[3] = call("SCARD", trash)
  elseif code == "B" then
    local owner, placeholder, member, rprefix = argv[p+1], argv[p+2], argv[p+3], argv[p+4]
    call("ZREM", owner .. ":pending", placeholder)
    if member ~= placeholder then
      call("SREM", owner, placeholder)
      call("SADD", owner, member)
      if rprefix ~= "" then call("SADD", rprefix .. escape(member), argv[p+5]) end
    end
  elseif code == "N" then
    local key, deadline = argv[p+1], int(now + argv[p+2])
    for q = p + 4, p + 3 + argv[p+3] do
      local held = tonumber(call("ZSCORE", key, argv[q]))
      if held and held > now then call("ZADD", key, "XX", deadline, argv[q]) end
    end
  elseif code == "O" then
    local key, peak_key, month = argv[p+1], argv[p+2], argv[p+3]
    call("ZADD", key, int(now + argv[p+5]), argv[p+4])
    local online = call("ZCOUNT", key, "(" .. NOW, "+inf")
    local peak = tonumber(call("HGET", peak_key, month)) or 0
    if online > peak then call("HSET", peak_key, month, online) end
    reply[2] = online
  elseif code == "Z" then
    call("ZREM", argv[p+1], argv[p+2])
  end
end
return reply
