-- :checkhealth vist2
local M = {}

-- vim.health (0.9+: start/ok/warn/error) or the older health module (report_*).
local health = vim.health or require("health")
local start = health.start or health.report_start
local ok = health.ok or health.report_ok
local warn = health.warn or health.report_warn
local error = health.error or health.report_error

local PROTOCOL = 1

function M.check()
  local config = require("vist2").config
  start("vist2")
  local v = vim.version()
  local version = string.format("%d.%d.%d", v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.7") == 1 then
    ok("Neovim " .. version)
  else
    error("Neovim " .. version .. " is too old; vist2 needs 0.7 or later")
  end
  if vim.fn.executable(config.cmd) == 0 then
    error(config.cmd .. " not found", { "install vist2 (see its README) or set require('vist2').setup({ cmd = '/path/to/vist2ctl' })" })
    return
  end
  ok(config.cmd .. " found: " .. vim.fn.exepath(config.cmd))
  local args = { config.cmd, "status", "--json" }
  if config.socket then
    vim.list_extend(args, { "--socket", config.socket })
  end
  local out = vim.fn.system(args)
  if vim.v.shell_error ~= 0 then
    error("the vist2 daemon is not reachable: " .. vim.trim(out), {
      "start it: systemctl --user start vist2d.socket (or run vist2d)",
      "or point the plugin at its socket: require('vist2').setup({ socket = '...' })",
    })
    return
  end
  local decoded, s = pcall((vim.json or {}).decode or vim.fn.json_decode, out)
  if not decoded or type(s) ~= "table" then
    error("unexpected answer from " .. config.cmd .. " status --json: " .. out)
    return
  end
  if s.state == "ready" then
    ok(string.format("daemon ready: model %s (%s), %d documents open", s.model, s.server_version, s.documents_open or 0))
  else
    warn("daemon state: " .. tostring(s.state))
  end
  if s.protocol_version == PROTOCOL then
    ok("protocol version " .. s.protocol_version)
  else
    error(string.format("the daemon speaks protocol %s, this plugin %d", tostring(s.protocol_version), PROTOCOL))
  end
end

return M
