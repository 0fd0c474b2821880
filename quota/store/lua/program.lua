-- Runs one program of quota ops atomically: every op is checked, then all are applied, or none.
-- The semantics are those of quota/store/memory.py; tests run the same suite against both.
--
-- KEYS[1]: any key of the app, for routing (every key below shares its {org#app} hash tag).
-- ARGV[1]: now, in milliseconds. ARGV[2..]: ops, each an opcode then its fields:
--   R key limit window_ms cost                               sliding-window rate
--   A owner cap pending_ttl rev_prefix rev_cap rev_value n m1..mn   add members (capped)
--   X owner rev_prefix rev_value n m1..mn                       remove members
--   D owner rev_prefix value                                    drop an owner's set
--   B owner placeholder member                                  bind a reservation
--   L dau_key mau_key user dau_cap keep_s                       login (DAU/MAU)
--   O online peak month conn ttl_ms cap share_bp mau_last mau_this   hold a connection lease
--   Z online conn                                               release a lease
-- Returns {1, online, nrates, (remaining, reset_ms)*, nadds, (k, size, member*k)*} when applied, or
-- {0, op_index, kind, used, cap, a, b, c, who} when refused (rate: a,b,c = prev, cur, elapsed;
-- owner: a = room left; member: who).

local now = tonumber(ARGV[1])

-- Same escaping as quota/keys.py: percent-encode every byte outside [A-Za-z0-9_.-].
local function escape(s)
  return (string.gsub(s, "[^%w_%.%-]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local ops = {}
local i = 2
local n_args = #ARGV
while i <= n_args do
  local code = ARGV[i]
  local op = {code = code}
  if code == "R" then
    op.key, op.limit, op.window, op.cost = ARGV[i+1], tonumber(ARGV[i+2]), tonumber(ARGV[i+3]), tonumber(ARGV[i+4])
    i = i + 5
  elseif code == "A" then
    op.owner, op.cap, op.pending = ARGV[i+1], tonumber(ARGV[i+2]), tonumber(ARGV[i+3])
    op.rprefix, op.rcap, op.rvalue = ARGV[i+4], tonumber(ARGV[i+5]), ARGV[i+6]
    local n = tonumber(ARGV[i+7])
    op.members = {}
    for j = 1, n do op.members[j] = ARGV[i+7+j] end
    i = i + 8 + n
  elseif code == "X" then
    op.owner, op.rprefix, op.rvalue = ARGV[i+1], ARGV[i+2], ARGV[i+3]
    local n = tonumber(ARGV[i+4])
    op.members = {}
    for j = 1, n do op.members[j] = ARGV[i+4+j] end
    i = i + 5 + n
  elseif code == "D" then
    op.owner, op.rprefix, op.value = ARGV[i+1], ARGV[i+2], ARGV[i+3]
    i = i + 4
  elseif code == "B" then
    op.owner, op.placeholder, op.member = ARGV[i+1], ARGV[i+2], ARGV[i+3]
    i = i + 4
  elseif code == "L" then
    op.dau, op.mau, op.user, op.cap, op.keep = ARGV[i+1], ARGV[i+2], ARGV[i+3], tonumber(ARGV[i+4]), tonumber(ARGV[i+5])
    i = i + 6
  elseif code == "O" then
    op.online, op.peak, op.month, op.conn = ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
    op.ttl, op.cap, op.share = tonumber(ARGV[i+5]), tonumber(ARGV[i+6]), tonumber(ARGV[i+7])
    op.mau_last, op.mau_this = ARGV[i+8], ARGV[i+9]
    i = i + 10
  elseif code == "Z" then
    op.online, op.conn = ARGV[i+1], ARGV[i+2]
    i = i + 3
  else
    return redis.error_reply("quota: unknown opcode " .. tostring(code))
  end
  ops[#ops + 1] = op
end

local function window(op)
  local index = math.floor(now / op.window)
  local elapsed = now - index * op.window
  local prev = tonumber(redis.call("GET", op.key .. ":" .. (index - 1))) or 0
  local cur = tonumber(redis.call("GET", op.key .. ":" .. index)) or 0
  return index, elapsed, prev, cur
end

local function weighted(prev, cur, elapsed, w)
  return math.floor(prev * (w - elapsed) / w) + cur
end

local function purge_pending(owner)
  local pkey = owner .. ":pending"
  local expired = redis.call("ZRANGEBYSCORE", pkey, "-inf", now, "LIMIT", 0, 64)
  for _, placeholder in ipairs(expired) do
    redis.call("SREM", owner, placeholder)
    redis.call("ZREM", pkey, placeholder)
  end
end

local function lease_cap(op)
  if op.share == 0 then return op.cap end
  local mau = math.max(redis.call("SCARD", op.mau_last), redis.call("SCARD", op.mau_this))
  return math.max(op.cap, math.floor(op.share * mau / 10000))
end

-- Check every op; nothing is written until all pass.
local rates = {}
for index, op in ipairs(ops) do
  local code = op.code
  if code == "R" then
    local _, elapsed, prev, cur = window(op)
    local used = weighted(prev, cur, elapsed, op.window)
    if used + op.cost > op.limit then
      return {0, index - 1, "rate", used, op.limit, prev, cur, elapsed, ""}
    end
    rates[#rates + 1] = {op.limit - used - op.cost, op.window - elapsed}
  elseif code == "A" then
    if op.pending > 0 then purge_pending(op.owner) end
    local size = redis.call("SCARD", op.owner)
    local new = {}
    for _, m in ipairs(op.members) do
      if redis.call("SISMEMBER", op.owner, m) == 0 then new[#new + 1] = m end
    end
    op.new = new
    if op.cap >= 0 and size + #new > op.cap then
      return {0, index - 1, "owner", size, op.cap, math.max(0, op.cap - size), 0, 0, ""}
    end
    if op.rprefix ~= "" and op.rcap >= 0 then
      for _, m in ipairs(new) do
        local rkey = op.rprefix .. escape(m)
        local rsize = redis.call("SCARD", rkey)
        if redis.call("SISMEMBER", rkey, op.rvalue) == 0 and rsize + 1 > op.rcap then
          return {0, index - 1, "member", rsize, op.rcap, 0, 0, 0, m}
        end
      end
    end
  elseif code == "L" then
    if op.cap >= 0 and redis.call("SISMEMBER", op.dau, op.user) == 0 then
      local size = redis.call("SCARD", op.dau)
      if size >= op.cap then return {0, index - 1, "dau", size, op.cap, 0, 0, 0, ""} end
    end
  elseif code == "O" then
    redis.call("ZREMRANGEBYSCORE", op.online, "-inf", now)
    local cap = lease_cap(op)
    if cap >= 0 and not redis.call("ZSCORE", op.online, op.conn) then
      local size = redis.call("ZCARD", op.online)
      if size >= cap then return {0, index - 1, "online", size, cap, 0, 0, 0, ""} end
    end
  end
end

-- Apply.
local adds = {}
local online = 0
for _, op in ipairs(ops) do
  local code = op.code
  if code == "R" then
    local index = math.floor(now / op.window)
    local key = op.key .. ":" .. index
    redis.call("INCRBY", key, op.cost)
    redis.call("PEXPIRE", key, op.window * 2 + 1000)
  elseif code == "A" then
    for _, m in ipairs(op.new) do
      redis.call("SADD", op.owner, m)
      if op.rprefix ~= "" then redis.call("SADD", op.rprefix .. escape(m), op.rvalue) end
      if op.pending > 0 then redis.call("ZADD", op.owner .. ":pending", now + op.pending, m) end
    end
    adds[#adds + 1] = {op.new, redis.call("SCARD", op.owner)}
  elseif code == "X" then
    for _, m in ipairs(op.members) do
      redis.call("SREM", op.owner, m)
      if op.rprefix ~= "" then redis.call("SREM", op.rprefix .. escape(m), op.rvalue) end
    end
  elseif code == "D" then
    for _, m in ipairs(redis.call("SMEMBERS", op.owner)) do
      redis.call("SREM", op.rprefix .. escape(m), op.value)
    end
    redis.call("DEL", op.owner)
  elseif code == "B" then
    if redis.call("ZREM", op.owner .. ":pending", op.placeholder) == 1 then
      redis.call("SREM", op.owner, op.placeholder)
      redis.call("SADD", op.owner, op.member)
    end
  elseif code == "L" then
    redis.call("SADD", op.dau, op.user)
    redis.call("SADD", op.mau, op.user)
    redis.call("EXPIRE", op.dau, op.keep)
    redis.call("EXPIRE", op.mau, op.keep)
  elseif code == "O" then
    redis.call("ZADD", op.online, now + op.ttl, op.conn)
    online = redis.call("ZCARD", op.online)
    local peak = tonumber(redis.call("HGET", op.peak, op.month)) or 0
    if online > peak then redis.call("HSET", op.peak, op.month, online) end
  elseif code == "Z" then
    redis.call("ZREM", op.online, op.conn)
  end
end

local reply = {1, online, #rates}
for _, r in ipairs(rates) do
  reply[#reply + 1] = r[1]
  reply[#reply + 1] = r[2]
end
reply[#reply + 1] = #adds
for _, add in ipairs(adds) do
  reply[#reply + 1] = #add[1]
  reply[#reply + 1] = add[2]
  for _, m in ipairs(add[1]) do reply[#reply + 1] = m end
end
return reply
