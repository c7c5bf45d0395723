;;; vist2-tests.el --- ERT tests of vist2.el against a live vist2d -*- lexical-binding: t; -*-

;;; Commentary:

;; Run by editors/tests/test_emacs.py:
;;   emacs --batch -L editors/emacs -l vist2-tests -f ert-run-tests-batch-and-exit
;; with VIST2_TEST_BIN (vist2d and vist2ctl), VIST2_TEST_MODEL (the tiny test model),
;; VIST2_TEST_DOC (a document the tiny model reads whole) and VIST2_TEST_DIR (scratch) set.
;; Each test starts its own daemon on a socket in VIST2_TEST_DIR.

;;; Code:

(require 'ert)
(require 'vist2)

(defvar vist2-test--daemon nil)
(defvar vist2-test--model nil
  "The daemon's model, or nil for VIST2_TEST_MODEL (the tiny one).")
(defvar vist2-test--dir nil)

(defun vist2-test--env (name)
  "The environment variable NAME, which must be set."
  (or (getenv name) (error "%s is not set" name)))

(defun vist2-test--socket () (expand-file-name "run/vist2.sock" vist2-test--dir))
(defun vist2-test--bin (name) (expand-file-name name (vist2-test--env "VIST2_TEST_BIN")))

(defun vist2-test--wait (pred &optional timeout)
  "Serve processes and timers until PRED holds.
Waits at most TIMEOUT seconds (default 30)."
  (let ((deadline (+ (float-time) (or timeout 30))))
    (while (and (not (funcall pred)) (< (float-time) deadline))
      (accept-process-output nil 0.02))
    (funcall pred)))

(defun vist2-test--start-daemon ()
  "Start vist2d on the tiny model and wait for its socket."
  (make-directory (expand-file-name "run" vist2-test--dir) t)
  (setq vist2-test--daemon
        (make-process :name "vist2d" :noquery t :buffer nil
                      :stderr (get-buffer-create " *vist2d-stderr*")
                      :command (list (vist2-test--bin "vist2d") "--model" (or vist2-test--model (vist2-test--env "VIST2_TEST_MODEL"))
                                     "--socket" (vist2-test--socket) "--threads" "1"
                                     "--cache-dir" (expand-file-name "cache" vist2-test--dir))))
  (should (vist2-test--wait (lambda () (file-exists-p (vist2-test--socket))) 60)))

(defun vist2-test--kill-daemon (signal)
  "Stop the daemon with SIGNAL and wait for it to end."
  (when (process-live-p vist2-test--daemon)
    (signal-process vist2-test--daemon signal)
    (vist2-test--wait (lambda () (not (process-live-p vist2-test--daemon))))))

(defun vist2-test--ctl (&rest args)
  "Run vist2ctl with ARGS against the test daemon and parse its JSON.
Options are inserted before any \"--\" in ARGS."
  (let* ((at (or (seq-position args "--") (length args)))
         (argv (append (seq-take args at) (list "--json" "--socket" (vist2-test--socket)) (seq-drop args at))))
    (with-temp-buffer
      (let ((status (apply #'call-process (vist2-test--bin "vist2ctl") nil (list t nil) nil argv)))
        (unless (eq status 0) (error "vist2ctl %S failed: %s" args (buffer-string)))
        (json-parse-string (buffer-string) :object-type 'alist :null-object nil :false-object nil)))))

(defun vist2-test--metric (name)
  "The value of the daemon's metric NAME (0 when absent)."
  (let ((text (alist-get 'prometheus_text (vist2-test--ctl "metrics"))))
    (if (string-match (concat "^" (regexp-quote name) " \\([0-9.e+]+\\)$") text)
        (string-to-number (match-string 1 text))
      0)))

(defun vist2-test--reference (texts prompt max-tokens)
  "What `vist2ctl generate --json' answers for TEXTS and PROMPT.
TEXTS are the documents; sampling is greedy, MAX-TOKENS at most."
  (let ((args (list "generate" "--temperature" "0" "--max-tokens" (number-to-string max-tokens)))
        (i 0))
    (dolist (text texts)
      (let ((file (expand-file-name (format "ref%d.txt" i) vist2-test--dir)))
        (with-temp-file file
          (set-buffer-file-coding-system 'utf-8-unix)
          (insert text))
        (setq args (append args (list "--doc" file))
              i (1+ i))))
    (alist-get 'text (apply #'vist2-test--ctl (append args (list "--" prompt))))))

(defun vist2-test--documents-open ()
  (alist-get 'documents_open (vist2-test--ctl "status")))

(defmacro vist2-test--with-daemon (&rest body)
  "Run BODY with a fresh daemon and bridge.
The current buffer visits a copy of the test document."
  (declare (indent 0))
  `(let* ((vist2-test--dir (make-temp-file "vist2-emacs-" t))
          (process-environment (cons (concat "XDG_RUNTIME_DIR=" vist2-test--dir) process-environment))
          (vist2-socket (vist2-test--socket))
          (vist2-command (vist2-test--bin "vist2ctl"))
          (vist2-chat nil)
          (vist2-temperature 0)
          (vist2-max-tokens 12)
          (vist2-debounce 0.2)
          (file (expand-file-name "notes.txt" vist2-test--dir)))
     (copy-file (vist2-test--env "VIST2_TEST_DOC") file)
     (vist2-test--start-daemon)
     (unwind-protect
         (with-current-buffer (find-file-noselect file)
           ,@body)
       (dolist (b (buffer-list))
         (when (buffer-local-value 'vist2-mode b)
           (with-current-buffer b (set-buffer-modified-p nil) (kill-buffer b))))
       (when (get-buffer "*vist2*") (kill-buffer "*vist2*"))
       (when (and vist2--process (process-live-p vist2--process))
         (delete-process vist2--process))
       (setq vist2--current nil vist2--state 'idle)
       (vist2-test--kill-daemon 'SIGTERM)
       (delete-directory vist2-test--dir t))))

(defun vist2-test--ask (prompt &optional selection)
  "Ask PROMPT and wait for the whole answer; return it."
  (vist2-ask prompt selection)
  (should (vist2-test--wait (lambda () (not (eq vist2--state 'generating))) 60))
  (should (eq vist2--state 'idle))
  (vist2-answer))

(defun vist2-test--text ()
  (save-restriction (widen) (buffer-substring-no-properties (point-min) (point-max))))

(ert-deftest vist2-attach-edit-ask-detach ()
  (vist2-test--with-daemon
   (vist2-mode 1)
   (should (vist2-test--wait (lambda () (eq (vist2-test--documents-open) 1))))
   ;; Several quick edits reach the daemon as one update, after the debounce.
   (let ((updates "vist2_requests_total{type=\"update_document\"}")
         before)
     (vist2-test--wait (lambda () vist2--daemon-up))
     (setq before (vist2-test--metric updates))
     (dotimes (i 3)
       (goto-char (point-min))
       (insert (format "edit%d " i)))
     (should (= (vist2-test--metric updates) before))
     (should (vist2-test--wait (lambda () (= (vist2-test--metric updates) (1+ before)))))
     (vist2-test--wait (lambda () nil) 0.4)
     (should (= (vist2-test--metric updates) (1+ before))))
   ;; The ask streams into *vist2*; its text is what vist2ctl generate answers.
   (let ((answer (vist2-test--ask "Summarize:")))
     (should (equal answer (vist2-test--reference (list (vist2-test--text)) "Summarize:" 12)))
     (should (equal (alist-get 'event vist2-last-result) "done"))
     (should (get-buffer-window "*vist2*")))
   ;; Only the chunks an edit touches are encoded again.
   (let ((encoded (vist2-test--metric "vist2_chunks_encoded_total")))
     (goto-char (point-max))
     (insert "One more line.\n")
     (let ((answer (vist2-test--ask "Summarize:")))
       (should (<= (- (vist2-test--metric "vist2_chunks_encoded_total") encoded) 2))
       (should (equal answer (vist2-test--reference (list (vist2-test--text)) "Summarize:" 12)))))
   ;; A selection is added to the prompt.
   (let ((selection (buffer-substring-no-properties (point-min) (+ (point-min) 40))))
     (should (equal (vist2-test--ask "Explain:" selection)
                    (vist2-test--reference (list (vist2-test--text)) (concat "Explain:\n\n" selection) 12))))
   ;; Killing the buffer closes its document.
   (set-buffer-modified-p nil)
   (kill-buffer (current-buffer))
   (should (vist2-test--wait (lambda () (eq (vist2-test--documents-open) 0))))))

(ert-deftest vist2-cancel-stops-the-stream ()
  ;; The default model (~75 tokens/s here): the tiny one writes its ~600 tokens in a fifth of a
  ;; second, too fast to stop in the middle.
  (let ((vist2-test--model "default"))
    (vist2-test--with-daemon
     (vist2-mode 1)
     (let ((events nil)
           (vist2-max-tokens 2000))
       (let ((vist2-request-started-hook (list (lambda () (push 'started events))))
             (vist2-request-finished-hook (list (lambda () (push 'finished events)))))
         (vist2-ask "Write a long story:")
         (should (vist2-test--wait (lambda () (> (length (or (vist2-answer) "")) 3))))
         (should (equal (vist2-status-string) "generating"))
         ;; C-g in *vist2* stops it.
         (with-current-buffer "*vist2*"
           (should (eq (key-binding (kbd "C-g")) #'vist2-answer-interrupt))
           (call-interactively (key-binding (kbd "C-g"))))
         (should (vist2-test--wait (lambda () (eq vist2--state 'cancelled))))
         (let ((stopped (vist2-answer)))
           (vist2-test--wait (lambda () nil) 0.5)
           (should (equal (vist2-answer) stopped))
           (should (< (length stopped) 8000)))
         (should (equal (vist2-status-string) "cancelled"))
         (should (equal (alist-get 'code (alist-get 'error vist2-last-result)) "cancelled"))
         (should (equal (reverse events) '(started finished)))
         ;; So does M-x vist2-cancel, and q.
         (vist2-ask "Write a long story:")
         (should (vist2-test--wait (lambda () (> (length (or (vist2-answer) "")) 3))))
         (should (vist2-cancel))
         (should (vist2-test--wait (lambda () (eq vist2--state 'cancelled))))
         (vist2-ask "Write a long story:")
         (should (vist2-test--wait (lambda () (> (length (or (vist2-answer) "")) 3))))
         ;; As typed in the answer window (its keymap is the selected window's).
         (with-selected-window (get-buffer-window "*vist2*") (execute-kbd-macro (kbd "q")))
         (should (vist2-test--wait (lambda () (eq vist2--state 'cancelled)))))))))

(ert-deftest vist2-daemon-restart-mid-session ()
  (vist2-test--with-daemon
   (vist2-mode 1)
   (should (vist2-test--wait (lambda () (eq (vist2-test--documents-open) 1))))
   (vist2-test--kill-daemon 'SIGKILL)
   (should (vist2-test--wait (lambda () (equal (vist2-status-string) "daemon down"))))
   (goto-char (point-min))
   (insert "Edited while the daemon was down.\n")
   (vist2-test--wait (lambda () nil) 0.4)
   (vist2-test--start-daemon)
   (should (vist2-test--wait (lambda () vist2--daemon-up)))
   (should (equal (vist2-test--ask "Summarize:")
                  (vist2-test--reference (list (vist2-test--text)) "Summarize:" 12)))))

(ert-deftest vist2-compress-keeps-emacs-responsive ()
  ;; The whole licence on the default model: ~30 chunks, seconds of encoding and prefill.
  (let ((vist2-test--model "default"))
    (vist2-test--with-daemon
     (erase-buffer)
     (insert-file-contents "/usr/share/common-licenses/Apache-2.0")
     (let* ((ticks 0)
            (timer (run-with-timer 0.005 0.005 (lambda () (setq ticks (1+ ticks)))))
            (seen nil))
       (unwind-protect
           (progn
             (vist2-compress)
             (while (progn (push (vist2-status-string) seen)
                           (accept-process-output nil 0.005)
                           (eq vist2--state 'compressing))))
         (cancel-timer timer))
       (should (equal (alist-get 'event vist2-last-result) "compressed"))
       (should (seq-some (lambda (s) (and (string-prefix-p "compressing " s) (not (equal s "compressing 0%"))))
                         seen))
       (should (> ticks 50))
       (should (string-match-p "chunks" (with-current-buffer "*Messages*" (buffer-string))))))))

(ert-deftest vist2-refused-buffer-leaves-the-mode ()
  (vist2-test--with-daemon
   (erase-buffer)
   (insert (make-string (1+ (* 4 1024 1024)) ?x))
   (vist2-mode 1)
   (should (vist2-test--wait (lambda () (not vist2-mode))))
   (should (string-match-p "cannot attach .*document_too_large"
                           (with-current-buffer "*Messages*" (buffer-string))))
   (set-buffer-modified-p nil)))

(ert-deftest vist2-status-reports-the-daemon ()
  (vist2-test--with-daemon
   (vist2-mode 1)
   (should (vist2-test--wait (lambda () vist2--daemon-up)))
   (vist2-status)
   (should (vist2-test--wait
            (lambda () (string-match-p "vist2: ready, model .*1 attached here, 1 documents open"
                                       (with-current-buffer "*Messages*" (buffer-string))))))))

(provide 'vist2-tests)
;;; vist2-tests.el ends here
