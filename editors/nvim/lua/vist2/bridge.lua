-- The plugin's end of `vist2ctl bridge` (docs/BRIDGE.md): one child process, JSON lines both
-- ways. Works with Neovim 0.7 (vim.loop, no vim.uv or vim.system).
local uv = vim.loop
local json = vim.json or { encode = vim.fn.json_encode, decode = vim.fn.json_decode }

local Bridge = {}
Bridge.__index = Bridge

-- opts: cmd, socket, retry_interval. on_event(e): events without an id (daemon_up, daemon_down,
-- document_lost), and `{event = "bridge_exit"}` when the process ends.
function Bridge.new(opts, on_event)
  return setmetatable({ opts = opts, on_event = on_event, pending = {}, next_id = 0, partial = "" }, Bridge)
end

function Bridge:running()
  return self.handle ~= nil
end

function Bridge:start()
  if self.handle then
    return true
  end
  local args = { "bridge", "--client-name", "nvim-vist2" }
  if self.opts.socket then
    vim.list_extend(args, { "--socket", self.opts.socket })
  end
  self.stdin = uv.new_pipe(false)
  self.stdout = uv.new_pipe(false)
  self.stderr = uv.new_pipe(false)
  self.partial = ""
  self.stderr_text = ""
  local handle, err = uv.spawn(self.opts.cmd, { args = args, stdio = { self.stdin, self.stdout, self.stderr } }, function(code)
    vim.schedule(function()
      self:_exited(code)
    end)
  end)
  if not handle then
    for _, p in ipairs({ self.stdin, self.stdout, self.stderr }) do
      p:close()
    end
    return false, "cannot run " .. self.opts.cmd .. ": " .. tostring(err)
  end
  self.handle = handle
  self.stdout:read_start(function(_, data)
    if not data then
      return
    end
    -- Fast context: split into lines here, handle them on the main loop in order.
    local text = self.partial .. data
    local lines = {}
    local start = 1
    while true do
      local nl = text:find("\n", start, true)
      if not nl then
        break
      end
      lines[#lines + 1] = text:sub(start, nl - 1)
      start = nl + 1
    end
    self.partial = text:sub(start)
    if #lines > 0 then
      vim.schedule(function()
        for _, line in ipairs(lines) do
          self:_line(line)
        end
      end)
    end
  end)
  self.stderr:read_start(function(_, data)
    if data then
      self.stderr_text = (self.stderr_text .. data):sub(-2000)
    end
  end)
  return true
end

function Bridge:_line(line)
  local ok, e = pcall(json.decode, line)
  if not ok or type(e) ~= "table" then
    return
  end
  local id = e.id
  if id == nil or id == vim.NIL then
    if e.event == "error" then
      self.on_event({ event = "protocol_error", error = e.error })
    else
      self.on_event(e)
    end
    return
  end
  local h = self.pending[id]
  if not h then
    return
  end
  if e.final then
    self.pending[id] = nil
  end
  h(e)
end

function Bridge:_exited(code)
  for _, p in ipairs({ self.stdin, self.stdout, self.stderr }) do
    if p and not p:is_closing() then
      p:close()
    end
  end
  self.handle = nil
  local pending = self.pending
  self.pending = {}
  for id, h in pairs(pending) do
    h({ id = id, event = "error", final = true, error = { code = "bridge_exited", message = "vist2ctl bridge exited (" .. tostring(code) .. ")" } })
  end
  self.on_event({ event = "bridge_exit", code = code, stderr = self.stderr_text })
end

-- Sends a request; handler(e) gets each of its events, the last one with e.final. Returns the id.
function Bridge:request(req, handler)
  local ok, err = self:start()
  if not ok then
    vim.schedule(function()
      handler({ event = "error", final = true, error = { code = "bridge_unavailable", message = err } })
    end)
    return nil
  end
  self.next_id = self.next_id + 1
  req.id = self.next_id
  self.pending[req.id] = handler or function() end
  self.stdin:write(json.encode(req) .. "\n")
  return req.id
end

-- Ends the bridge now (what it had in flight stops with the connection).
function Bridge:stop()
  if self.handle then
    self.handle:kill("sigterm")
  end
end

return Bridge
