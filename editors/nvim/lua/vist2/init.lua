-- vist2 for Neovim: attached buffers are documents in the vist2 daemon (kept up to date as you
-- type), asks stream answers into a scratch split. See :help vist2.
local Bridge = require("vist2.bridge")

local M = {}

local defaults = {
  cmd = "vist2ctl", -- the vist2ctl executable
  socket = nil, -- the daemon's socket (nil: vist2ctl's default, $XDG_RUNTIME_DIR/vist2/vist2.sock)
  debounce_ms = 300, -- quiet time after an edit before the buffer is sent again
  auto_attach = {}, -- filetypes attached when a buffer of that type is opened
  chat = true, -- wrap asks in the model's chat template
  max_tokens = 256,
  temperature = 0.2,
  seed = 0,
  full_text = false, -- read the documents as text (the baseline) instead of compressed
  answer_split = "botright vsplit", -- how the answer window opens
}

M.config = vim.deepcopy(defaults)

local bridge
local docs = {} -- bufnr -> { handle, timer, dirty }
local order = {} -- bufnr in attach order (the context order of an ask)
local handles = 0
local state = { kind = "idle", daemon = nil } -- kind: idle / compressing / generating / cancelled / error
local current -- the running request: { id, kind, buf }
local answer_buf
local augroup

local function notify(msg, level)
  vim.api.nvim_echo({ { "vist2: " .. msg, level == vim.log.levels.ERROR and "ErrorMsg" or level == vim.log.levels.WARN and "WarningMsg" or "None" } }, true, {})
end

local function fire(pattern)
  vim.api.nvim_exec_autocmds("User", { pattern = pattern, modeline = false })
end

-- nil or 0: the current buffer.
local function bufnr(buf)
  return (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
end

local function buffer_text(buf)
  local text = table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
  if vim.bo[buf].eol and text ~= "" then
    text = text .. "\n"
  end
  return text
end

local function on_event(e)
  if e.event == "daemon_up" then
    state.daemon = true
  elseif e.event == "daemon_down" then
    state.daemon = false
  elseif e.event == "bridge_exit" then
    state.daemon = false
    -- The next request starts a new bridge; the attached buffers are opened on it again.
    for buf, d in pairs(docs) do
      d.opened = false
    end
  elseif e.event == "document_lost" then
    notify("the daemon refused a document when it came back: " .. (e.error and e.error.message or "?"), vim.log.levels.WARN)
  end
end

local function get_bridge()
  if not bridge then
    bridge = Bridge.new({ cmd = M.config.cmd, socket = M.config.socket }, on_event)
  end
  if not bridge:running() then
    local ok, err = bridge:start()
    if not ok then
      return nil, err
    end
    -- A new bridge process: open every attached buffer on it again.
    for _, buf in ipairs(order) do
      local d = docs[buf]
      if d and not d.opened then
        d.opened = true
        bridge:request({ op = "open", document = d.handle, text = buffer_text(buf), path = vim.api.nvim_buf_get_name(buf) }, function(ev)
          if ev.event == "error" then
            notify("cannot open " .. vim.api.nvim_buf_get_name(buf) .. ": " .. ev.error.message, vim.log.levels.ERROR)
          end
        end)
      end
    end
  end
  return bridge
end

-- The bridge, started if need be; nil (and the reason shown) when it cannot run.
local function bridge_or_notify()
  local b, err = get_bridge()
  if not b then
    notify(err, vim.log.levels.ERROR)
  end
  return b
end

local function send_update(buf)
  local d = docs[buf]
  if not d then
    return
  end
  d.dirty = false
  local b = get_bridge()
  if not b then
    return
  end
  b:request({ op = "update", document = d.handle, text = buffer_text(buf) }, function(e)
    if e.event == "error" then
      notify("update failed: " .. e.error.message, vim.log.levels.WARN)
    end
  end)
end

-- Sends every buffer edited since its last update now (before an ask reads them).
local function flush()
  for buf, d in pairs(docs) do
    if d.dirty then
      d.timer:stop()
      send_update(buf)
    end
  end
end

function M.attach(buf)
  buf = bufnr(buf)
  if docs[buf] then
    return true
  end
  local b = bridge_or_notify()
  if not b then
    return false
  end
  handles = handles + 1
  local d = { handle = "nvim-" .. buf .. "-" .. handles, timer = vim.loop.new_timer(), dirty = false, opened = true }
  docs[buf] = d
  table.insert(order, buf)
  b:request({ op = "open", document = d.handle, text = buffer_text(buf), path = vim.api.nvim_buf_get_name(buf) }, function(e)
    if e.event == "error" then
      notify("cannot attach: " .. e.error.message, vim.log.levels.ERROR)
      M.detach(buf)
    end
  end)
  vim.api.nvim_buf_attach(buf, false, {
    on_lines = function()
      local cur = docs[buf]
      if not cur or cur ~= d then
        return true -- detached: stop listening
      end
      d.dirty = true
      d.timer:stop()
      d.timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
        if docs[buf] == d and d.dirty then
          send_update(buf)
        end
      end))
    end,
    on_reload = function()
      if docs[buf] == d then
        send_update(buf)
      end
    end,
    on_detach = function()
      if docs[buf] == d then
        vim.schedule(function()
          M.detach(buf)
        end)
      end
    end,
  })
  vim.api.nvim_create_autocmd("BufWipeout", {
    group = augroup,
    buffer = buf,
    once = true,
    callback = function()
      M.detach(buf)
    end,
  })
  return true
end

function M.detach(buf)
  buf = bufnr(buf)
  local d = docs[buf]
  if not d then
    return
  end
  docs[buf] = nil
  for i, b in ipairs(order) do
    if b == buf then
      table.remove(order, i)
      break
    end
  end
  d.timer:stop()
  d.timer:close()
  if bridge and bridge:running() then
    bridge:request({ op = "close", document = d.handle }, function() end)
  end
end

function M.is_attached(buf)
  buf = bufnr(buf)
  return docs[buf] ~= nil
end

-- The handles of the attached buffers, in attach order.
function M.documents()
  local out = {}
  for _, buf in ipairs(order) do
    out[#out + 1] = { buf = buf, document = docs[buf].handle }
  end
  return out
end

local function start_request(kind, buf)
  state.kind = kind
  state.percent = nil
  fire("Vist2RequestStarted")
end

local function finish_request(kind)
  current = nil
  state.kind = kind
  vim.cmd("redrawstatus")
  fire("Vist2RequestFinished")
end

local function answer_window()
  if not (answer_buf and vim.api.nvim_buf_is_valid(answer_buf)) then
    answer_buf = vim.api.nvim_create_buf(false, true)
    vim.api.nvim_buf_set_name(answer_buf, "vist2://answer")
    vim.bo[answer_buf].filetype = "markdown"
    vim.bo[answer_buf].bufhidden = "hide"
    vim.keymap.set("n", "q", function()
      if current then
        M.cancel()
      else
        vim.cmd("close")
      end
    end, { buffer = answer_buf, desc = "vist2: stop the answer, or close its window" })
    vim.keymap.set("n", "<C-c>", M.cancel, { buffer = answer_buf, desc = "vist2: stop the answer" })
  end
  local win = vim.fn.bufwinid(answer_buf)
  if win == -1 then
    local from = vim.api.nvim_get_current_win()
    vim.cmd(M.config.answer_split)
    win = vim.api.nvim_get_current_win()
    vim.api.nvim_win_set_buf(win, answer_buf)
    vim.api.nvim_set_current_win(from)
  end
  return answer_buf, win
end

local function append(buf, text)
  local last = vim.api.nvim_buf_line_count(buf)
  local tail = vim.api.nvim_buf_get_lines(buf, last - 1, last, false)[1] or ""
  local parts = vim.split(tail .. text, "\n", { plain = true })
  vim.api.nvim_buf_set_lines(buf, last - 1, last, false, parts)
  local win = vim.fn.bufwinid(buf)
  if win ~= -1 then
    vim.api.nvim_win_set_cursor(win, { vim.api.nvim_buf_line_count(buf), 0 })
  end
end

-- The answer so far (or the last one): the answer buffer's text below its header.
function M.answer()
  if not (answer_buf and vim.api.nvim_buf_is_valid(answer_buf)) then
    return nil
  end
  local lines = vim.api.nvim_buf_get_lines(answer_buf, 2, -1, false)
  return table.concat(lines, "\n")
end

-- Asks the model: the attached buffers are the context; the answer streams into a split.
-- opts (optional): max_tokens, temperature, seed, chat, full_text, selection.
function M.ask(prompt, opts)
  opts = opts or {}
  if current then
    notify("a request is running; :Vist2Cancel stops it", vim.log.levels.WARN)
    return nil
  end
  local b = bridge_or_notify()
  if not b then
    return nil
  end
  flush()
  if opts.selection and opts.selection ~= "" then
    prompt = prompt .. "\n\n" .. opts.selection
  end
  local buf = answer_window()
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "vist2> " .. vim.split(prompt, "\n", { plain = true })[1], "", "" })
  local handles_list = {}
  for _, d in ipairs(M.documents()) do
    handles_list[#handles_list + 1] = d.document
  end
  local req = {
    op = "generate",
    prompt = prompt,
    chat = opts.chat == nil and M.config.chat or opts.chat,
    max_tokens = opts.max_tokens or M.config.max_tokens,
    temperature = opts.temperature or M.config.temperature,
    seed = opts.seed or M.config.seed,
    full_text = opts.full_text == nil and M.config.full_text or opts.full_text,
  }
  if #handles_list > 0 then
    req.documents = handles_list -- an empty Lua table would be sent as {}, not []
  end
  start_request("generating")
  local id = b:request(req, function(e)
    if e.event == "delta" then
      if vim.api.nvim_buf_is_valid(buf) then
        append(buf, e.text)
      end
    elseif e.event == "done" then
      M.last_result = e
      finish_request("idle")
      notify(string.format("%d tokens, %.0f ms to first token%s", e.generated_tokens, e.ttft_ms or 0,
        e.compression_ratio and string.format(", documents compressed %.1fx", e.compression_ratio) or ""))
    elseif e.event == "error" then
      M.last_result = e
      if e.error.code == "cancelled" then
        finish_request("cancelled")
        notify("cancelled")
      else
        finish_request("error")
        notify(e.error.message .. " [" .. e.error.code .. "]", vim.log.levels.ERROR)
      end
    end
  end)
  if id then
    current = { id = id, kind = "generate" }
  end
  return id
end

-- Compresses the current buffer (attaching it) in the daemon, with progress in the message area.
function M.compress(buf, instruction)
  buf = bufnr(buf)
  if current then
    notify("a request is running; :Vist2Cancel stops it", vim.log.levels.WARN)
    return nil
  end
  if not M.attach(buf) then
    return nil
  end
  flush()
  local b = get_bridge()
  start_request("compressing")
  state.percent = 0
  local id = b:request({ op = "compress", document = docs[buf].handle, instruction = instruction or "", chat = M.config.chat }, function(e)
    if e.event == "progress" then
      state.percent = e.chunks_total > 0 and math.floor(100 * e.chunks_done / e.chunks_total) or 100
      vim.api.nvim_echo({ { string.format("vist2: compressing %d/%d chunks (%d%%)", e.chunks_done, e.chunks_total, state.percent) } }, false, {})
      vim.cmd("redrawstatus")
    elseif e.event == "compressed" then
      M.last_result = e
      finish_request("idle")
      notify(string.format("%d chunks, %d tokens -> %d visual tokens (%.1fx); encoded %d, from cache %d", e.chunks, e.text_tokens,
        e.visual_tokens, e.ratio, e.chunks_encoded, e.chunk_cache_hits + e.prefix_cache_hits))
    elseif e.event == "error" then
      M.last_result = e
      finish_request(e.error.code == "cancelled" and "cancelled" or "error")
      notify(e.error.message .. " [" .. e.error.code .. "]", e.error.code == "cancelled" and nil or vim.log.levels.ERROR)
    end
  end)
  if id then
    current = { id = id, kind = "compress" }
  end
  return id
end

-- Stops the running ask or compress (within one decode step).
function M.cancel()
  if not (current and bridge) then
    return false
  end
  bridge:request({ op = "cancel", target = current.id }, function() end)
  return true
end

-- idle / compressing 40% / generating / cancelled / error / daemon down (for statuslines).
function M.status()
  if state.kind == "compressing" then
    return "compressing " .. (state.percent or 0) .. "%"
  elseif state.kind == "generating" then
    return "generating"
  elseif state.daemon == false then
    return "daemon down"
  end
  return state.kind
end

-- :Vist2Status: the daemon's state, as the bridge reports it.
function M.show_status()
  local b = bridge_or_notify()
  if not b then
    return
  end
  b:request({ op = "status" }, function(e)
    if e.event == "status" then
      notify(string.format("%s, model %s (%s, protocol %d); %d attached here, %d documents open in the daemon, queue %d, up %d s",
        e.state, e.model, e.server_version or "?", e.protocol_version or 0, #order, e.documents_open, e.queue_length, e.uptime_seconds))
    else
      notify(e.error.message .. " [" .. e.error.code .. "]", vim.log.levels.ERROR)
    end
  end)
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(defaults), opts or {})
  augroup = vim.api.nvim_create_augroup("vist2", { clear = true })
  if #M.config.auto_attach > 0 then
    vim.api.nvim_create_autocmd("FileType", {
      group = augroup,
      pattern = M.config.auto_attach,
      callback = function(args)
        if vim.bo[args.buf].buftype == "" then
          M.attach(args.buf)
        end
      end,
    })
  end
  vim.api.nvim_create_autocmd("VimLeavePre", {
    group = augroup,
    callback = function()
      if bridge then
        bridge:stop()
      end
    end,
  })
end

augroup = vim.api.nvim_create_augroup("vist2", { clear = false })

return M
