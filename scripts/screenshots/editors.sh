#!/usr/bin/env bash
# Screenshots of the editor plugins for the README: a real Neovim and a real Emacs in tmux, on the
# default model, each with the Apache-2.0 licence attached and an answer streaming next to it.
# Writes docs/screenshots/{nvim,emacs}.png. Needs tmux, neovim, emacs-nox and Pillow for python3;
# the release build and the default model (scripts/fetch-model.sh).
#
#   bash scripts/screenshots/editors.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
BIN="$ROOT/.build/release"
OUT="$ROOT/docs/screenshots"
TMP="$(mktemp -d)"
export XDG_RUNTIME_DIR="$TMP/run" PATH="$BIN:$PATH"
mkdir -p "$XDG_RUNTIME_DIR" "$OUT"
DOC="$TMP/Apache-2.0.txt"
cp /usr/share/common-licenses/Apache-2.0 "$DOC"
PROMPT="What does this license say about patents?"
"$BIN/vist2d" --model default --cache-dir "$TMP/cache" 2>"$TMP/vist2d.log" &
DAEMON=$!
trap 'tmux kill-server 2>/dev/null || true; kill $DAEMON 2>/dev/null || true; rm -rf "$TMP"' EXIT
until vist2ctl status >/dev/null 2>&1; do sleep 0.2; done
# Compress first (what an editor session would have done while the user read the file), so the
# screenshot shows the answer streaming rather than the first encoding.
vist2ctl compress --chat --instruction "$PROMPT" "$DOC" >/dev/null

# Waits until the pane shows at least $2 characters of answer below the line holding $3, counting
# only columns from $4 on (the answer window's), then captures it with colours to $1.png.
capture() {
    local name="$1" min="$2" marker="$3" from="$4"
    for _ in $(seq 1 600); do
        # The answer: the lines after the marker, up to the window's end (a mode line or "~").
        if tmux capture-pane -p -t shot | cut -c"$from"- | awk -v mk="$marker" -v m="$min" '
            found && /^(-U|~)/ { found = 0 }
            found { gsub(/ /, ""); n += length($0) }
            index($0, mk) == 1 { found = 1 }
            END { exit !(n >= m) }'; then
            break
        fi
        sleep 0.1
    done
    tmux capture-pane -p -e -t shot > "$TMP/$name.ans"
    python3 "$ROOT/scripts/screenshots/ansi2png.py" "$TMP/$name.ans" "$OUT/$name.png"
    echo "wrote $OUT/$name.png"
}

# Neovim: the plugin from this checkout, no user config.
tmux new-session -d -s shot -x 180 -y 40 \
    "nvim -u NONE -i NONE -n --cmd 'set rtp^=$ROOT/editors/nvim' --cmd 'runtime! plugin/vist2.lua' \
     --cmd 'lua require(\"vist2\").setup({ max_tokens = 200, temperature = 0 })' \
     -c 'set laststatus=2 statusline=%f\ %=vist2:\ %{v:lua.require(\"vist2\").status()}' '$DOC'"
sleep 1
tmux send-keys -t shot ":Vist2Attach" Enter
sleep 0.5
tmux send-keys -t shot ":Vist2Ask $PROMPT" Enter
capture nvim 120 "vist2> " 92
tmux kill-session -t shot
sleep 0.5

# Emacs: the package from this checkout, no init file.
tmux new-session -d -s shot -x 150 -y 40 \
    "emacs -nw -Q -L '$ROOT/editors/emacs' -l vist2 --eval '(setq vist2-max-tokens 200 vist2-temperature 0)' '$DOC'"
sleep 1.5
tmux send-keys -t shot M-x "vist2-mode" Enter
sleep 0.5
tmux send-keys -t shot M-x "vist2-ask" Enter
sleep 0.3
tmux send-keys -t shot "$PROMPT" Enter
capture emacs 120 "vist2> " 1
tmux kill-session -t shot
