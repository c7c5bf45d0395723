-- vist2: commands and <Plug> mappings. No default mappings; see :help vist2.
if vim.g.loaded_vist2 then
  return
end
vim.g.loaded_vist2 = true

if vim.fn.has("nvim-0.7") == 0 then
  vim.api.nvim_echo({ { "vist2 needs Neovim 0.7 or later", "ErrorMsg" } }, true, {})
  return
end

local function vist2()
  return require("vist2")
end

local cmd = vim.api.nvim_create_user_command

cmd("Vist2Attach", function()
  vist2().attach(0)
end, { desc = "vist2: keep this buffer as a document in the daemon" })

cmd("Vist2Detach", function()
  vist2().detach(0)
end, { desc = "vist2: stop keeping this buffer in the daemon" })

cmd("Vist2Ask", function(opts)
  local selection
  if opts.range > 0 then
    local lines = vim.api.nvim_buf_get_lines(0, opts.line1 - 1, opts.line2, false)
    selection = table.concat(lines, "\n")
  end
  if opts.args == "" then
    vim.api.nvim_echo({ { "vist2: :Vist2Ask {prompt}", "ErrorMsg" } }, true, {})
    return
  end
  vist2().ask(opts.args, { selection = selection })
end, { nargs = "*", range = true, desc = "vist2: ask about the attached buffers (a range adds those lines)" })

cmd("Vist2Cancel", function()
  vist2().cancel()
end, { desc = "vist2: stop the running ask or compress" })

cmd("Vist2Compress", function(opts)
  vist2().compress(0, opts.args)
end, { nargs = "*", desc = "vist2: compress this buffer in the daemon (optionally for an instruction)" })

cmd("Vist2Status", function()
  vist2().show_status()
end, { desc = "vist2: the daemon's state" })

vim.keymap.set("n", "<Plug>(vist2-attach)", "<Cmd>Vist2Attach<CR>", { desc = "vist2: attach this buffer" })
vim.keymap.set("n", "<Plug>(vist2-detach)", "<Cmd>Vist2Detach<CR>", { desc = "vist2: detach this buffer" })
vim.keymap.set("n", "<Plug>(vist2-ask)", ":Vist2Ask ", { desc = "vist2: ask" })
vim.keymap.set("x", "<Plug>(vist2-ask)", ":Vist2Ask ", { desc = "vist2: ask about the selection" })
vim.keymap.set("n", "<Plug>(vist2-cancel)", "<Cmd>Vist2Cancel<CR>", { desc = "vist2: stop" })
vim.keymap.set("n", "<Plug>(vist2-compress)", "<Cmd>Vist2Compress<CR>", { desc = "vist2: compress this buffer" })
