-- mailhook's push-notification script for Dovecot 2.3.19 and later (Lua driver).
--
-- Collects the RFC 5423 notifications of each outermost mail transaction (an IMAP MOVE
-- is one: the append in the destination and the expunge in the source) and posts them,
-- as one JSON batch, to mailhook's Dovecot source once the transaction has committed.
-- mailhook answers as soon as the batch is durable (a few milliseconds). When it does
-- not answer, the batch waits in a spool file and is sent, in order, before the user's
-- next batch. Batch format: version 1 (see docs/sources.md, "Monitoring a Dovecot server").
--
-- Settings (plugin section of dovecot.conf):
--   mailhook_url         http://mailhook-ingest.mailhook-system:8080/v1/sources/dovecot
--   mailhook_token       a token of mailhook's Dovecot token file (--dovecot-token-file),
--                        or `<` + a file holding it; ingest tokens are refused. The mail
--                        users can read it, and it is good for the Dovecot routes only
--   mailhook_spool_dir   directory writable by the mail users (optional; without it a
--                        batch mailhook did not take is logged and dropped)
--   mailhook_timeout_ms  how long one POST may take (default 3000): the IMAP or LMTP
--                        command waits for it

local client = nil
-- Per user (a process may serve several, e.g. LMTP): nesting depth, session facts, and
-- the notifications of committed transactions not yet sent.
local users = {}
local sent_batches = 0
-- After a POST that got no answer, batches go straight to the spool for a few seconds:
-- one unreachable mailhook must not make every IMAP command wait for a connect.
local RETRY_AFTER_SECONDS = 5
local unreachable_until = 0

local function json_string(s)
  s = tostring(s)
  if utf8.len(s) == nil then
    -- Not UTF-8: keep what is ASCII rather than send bytes mailhook would refuse.
    s = s:gsub("[\128-\255]", "?")
  end
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

local function json(v)
  local t = type(v)
  if t == "nil" then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    local i = math.tointeger(v)
    if i ~= nil then return string.format("%d", i) end
    return string.format("%.17g", v)
  end
  if t == "string" then return json_string(v) end
  if t == "table" then
    if v[1] ~= nil or next(v) == nil and getmetatable(v) == "array" then
      local parts = {}
      for _, x in ipairs(v) do parts[#parts + 1] = json(x) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local parts = {}
    for k, x in pairs(v) do parts[#parts + 1] = json_string(k) .. ":" .. json(x) end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return "null"
end

-- An array that encodes as [] when empty.
local function array(t)
  local out = {}
  if type(t) == "table" then
    for _, x in ipairs(t) do out[#out + 1] = tostring(x) end
  end
  return setmetatable(out, { __metatable = "array" })
end

-- Dovecot before 2.3.19 passes system flags as a bitmask.
local FLAG_BITS = { { 1, "\\Answered" }, { 2, "\\Flagged" }, { 4, "\\Deleted" }, { 8, "\\Seen" },
  { 16, "\\Draft" }, { 32, "\\Recent" } }
local function flags_of(f)
  if type(f) == "number" then
    local out = {}
    local n = math.tointeger(f) or 0
    for _, b in ipairs(FLAG_BITS) do
      if n & b[1] ~= 0 then out[#out + 1] = b[2] end
    end
    return array(out)
  end
  return array(f)
end

local function integer(x)
  if type(x) ~= "number" then return nil end
  return math.tointeger(x) or math.floor(x)
end

local function setting(user, name, default)
  local v = user:plugin_getenv(name)
  if v == nil or v == "" then return default end
  return v
end

function script_init()
  return 0
end

local function http_client(timeout)
  if client == nil then
    client = dovecot.http.client({
      request_absolute_timeout_msecs = timeout,
      request_timeout_msecs = timeout,
      connect_timeout_msecs = math.min(timeout, 1000),
      max_attempts = 1,
      max_connect_attempts = 1,
      connect_backoff_time_msecs = 100,
      connect_backoff_max_time_msecs = 1000,
      user_agent = "mailhook-dovecot/1",
    })
  end
  return client
end

-- true when mailhook took the batch (or refused it for good: a 4xx other than 401, 403,
-- 408 and 429 means the batch itself is bad, and sending it again would not help).
local function post(state, body)
  if os.time() < unreachable_until then return false end
  local rq = http_client(state.timeout):request({ url = state.url, method = "POST" })
  rq:add_header("Content-Type", "application/json")
  rq:add_header("Authorization", "Bearer " .. state.token)
  rq:set_payload(body)
  local response = rq:submit()
  local status = response:status()
  if status >= 200 and status < 300 then return true end
  if status >= 400 and status < 500 and status ~= 401 and status ~= 403 and status ~= 408 and status ~= 429 then
    dovecot.i_error("mailhook refused a batch (HTTP " .. status .. "): " .. tostring(response:payload()))
    return true
  end
  dovecot.i_warning("mailhook did not take a batch: " .. status .. " " .. tostring(response:reason()))
  if status >= 9000 then unreachable_until = os.time() + RETRY_AFTER_SECONDS end
  return false
end

local function spool_path(state)
  if state.spool_dir == nil then return nil end
  return state.spool_dir .. "/" .. state.user:gsub("[^%w@._-]", "_") .. ".ndjson"
end

local function spool(state, lines)
  local path = spool_path(state)
  if path == nil then
    dovecot.i_error("mailhook: no mailhook_spool_dir; " .. #lines .. " batch(es) of " .. state.user .. " dropped")
    return
  end
  local f = io.open(path, "a")
  if f == nil then
    dovecot.i_error("mailhook: cannot write the spool " .. path .. "; batch dropped")
    return
  end
  for _, line in ipairs(lines) do f:write(line, "\n") end
  f:close()
end

-- Sends what waits in the user's spool, oldest first; false when mailhook still does
-- not answer (the rest goes back to the spool).
local function resend(state)
  local path = spool_path(state)
  if path == nil then return true end
  -- Known unreachable: leave the spool as it is (no rewrite per transaction).
  if os.time() < unreachable_until then return false end
  sent_batches = sent_batches + 1
  local taken = path .. ".sending." .. state.pid .. "." .. sent_batches
  if not os.rename(path, taken) then return true end -- nothing spooled
  local lines = {}
  local f = io.open(taken, "r")
  if f ~= nil then
    for line in f:lines() do
      if line ~= "" then lines[#lines + 1] = line end
    end
    f:close()
  end
  for i, line in ipairs(lines) do
    if not post(state, line) then
      spool(state, table.move(lines, i, #lines, 1, {}))
      os.remove(taken)
      return false
    end
  end
  os.remove(taken)
  return true
end

local function flush(state)
  local events = state.events
  state.events = {}
  if #events == 0 then return end
  sent_batches = sent_batches + 1
  local body = json({
    version = 1,
    batch = state.session .. ":" .. state.pid .. ":" .. sent_batches .. ":" .. os.time(),
    user = state.user,
    authUser = state.auth_user,
    service = state.service,
    remoteIp = state.remote_ip,
    session = state.session,
    at = os.time(),
    events = events,
  })
  if resend(state) and post(state, body) then return end
  spool(state, { body })
end

function dovecot_lua_notify_begin_txn(user)
  local state = users[user.username]
  if state == nil then
    local token = setting(user, "mailhook_token", "")
    state = {
      user = user.username,
      url = setting(user, "mailhook_url", "http://127.0.0.1:8080/v1/sources/dovecot"),
      token = token:gsub("%s+$", ""),
      spool_dir = setting(user, "mailhook_spool_dir", nil),
      timeout = tonumber(setting(user, "mailhook_timeout_ms", "3000")) or 3000,
      depth = 0,
      events = {},
    }
    users[user.username] = state
  end
  if state.depth == 0 then
    state.service = user.service
    state.remote_ip = user:var_expand("%{rip}")
    state.auth_user = user:var_expand("%{auth_user}")
    state.session = user:var_expand("%{session}")
    state.pid = user:var_expand("%{pid}")
  end
  state.depth = state.depth + 1
  -- The mail user object lives in the transaction only: a reference kept past it makes
  -- Dovecot panic when it frees the user.
  return { state = state, events = {}, user = user }
end

function dovecot_lua_notify_end_txn(ctx, success)
  local state = ctx.state
  ctx.user = nil
  if success then
    for _, e in ipairs(ctx.events) do state.events[#state.events + 1] = e end
  end
  state.depth = state.depth - 1
  if state.depth <= 0 then
    state.depth = 0
    flush(state)
  end
end

local function message(ctx, ev)
  table.insert(ctx.events, {
    event = ev.name,
    mailbox = ev.mailbox,
    uid = integer(ev.uid),
    uidValidity = integer(ev.uid_validity),
    messageId = ev.message_id,
    from = ev.from_address,
    to = ev.to_address,
    subject = ev.subject,
  })
end

local function flags(ctx, ev)
  local set = flags_of(ev.flags)
  local keywords = array(ev.keywords_set or ev.keywords_clear or ev.keywords)
  -- Every SELECT clears \Recent: the server's bookkeeping, nobody's act. Not sent.
  local meaningful = #keywords > 0
  for _, f in ipairs(set) do
    if f ~= "\\Recent" then meaningful = true end
  end
  if not meaningful then return end
  table.insert(ctx.events, {
    event = ev.name,
    mailbox = ev.mailbox,
    uid = integer(ev.uid),
    uidValidity = integer(ev.uid_validity),
    flags = set,
    keywords = keywords,
  })
end

local function plain(ctx, ev)
  table.insert(ctx.events, {
    event = ev.name,
    mailbox = ev.mailbox,
    mailboxOld = ev.mailbox_old,
    uid = integer(ev.uid),
    uidValidity = integer(ev.uid_validity),
  })
end

-- A created or renamed folder with its UIDVALIDITY: a folder created again gets a new
-- one, which tells mailhook one creation from another.
local function folder(ctx, ev)
  local uid_validity = nil
  local ok = pcall(function()
    local mbox = ctx.user:mailbox(ev.mailbox)
    uid_validity = integer(mbox:status(dovecot.storage.STATUS_UIDVALIDITY).uidvalidity)
    mbox:free()
  end)
  if not ok then uid_validity = nil end
  table.insert(ctx.events, {
    event = ev.name,
    mailbox = ev.mailbox,
    mailboxOld = ev.mailbox_old,
    uidValidity = uid_validity,
  })
end

dovecot_lua_notify_event_message_new = message
dovecot_lua_notify_event_message_append = message
dovecot_lua_notify_event_message_expunge = plain
dovecot_lua_notify_event_message_trash = plain
-- MessageRead is also reported as FlagsSet \Seen: not sent twice.
dovecot_lua_notify_event_flags_set = flags
dovecot_lua_notify_event_flags_clear = flags
dovecot_lua_notify_event_mailbox_create = folder
dovecot_lua_notify_event_mailbox_delete = plain
dovecot_lua_notify_event_mailbox_rename = folder
dovecot_lua_notify_event_mailbox_subscribe = plain
dovecot_lua_notify_event_mailbox_unsubscribe = plain
