;;; vist2.el --- Ask the vist2 context-compression daemon about your buffers -*- lexical-binding: t; -*-

;; Version: 0.1
;; Package-Requires: ((emacs "27.1"))
;; Keywords: tools, convenience
;; URL: https://github.com/vist2/vist2

;;; Commentary:

;; vist2d holds a VIST2 model that reads long text compressed into visual tokens.  This package
;; keeps buffers open as documents in the daemon, through `vist2ctl bridge' (JSON lines over one
;; daemon connection; see docs/BRIDGE.md in the vist2 repository), and streams answers into a
;; *vist2* buffer.
;;
;;   M-x vist2-mode       attach this buffer (edits are sent, debounced; killing it detaches)
;;   M-x vist2-ask        ask about the attached buffers (an active region is added to the prompt)
;;   M-x vist2-cancel     stop the running ask or compress (also C-g or q in *vist2*)
;;   M-x vist2-compress   compress this buffer in the daemon, with progress
;;   M-x vist2-status     the daemon's state
;;
;; `vist2-status-string' gives idle / compressing 40% / generating / daemon down for a mode line;
;; `vist2-request-started-hook' and `vist2-request-finished-hook' run around each request.

;;; Code:

(require 'json)
(require 'subr-x)

(defgroup vist2 nil
  "Use the vist2 context-compression daemon."
  :group 'tools
  :prefix "vist2-")

(defcustom vist2-command "vist2ctl"
  "The vist2ctl executable."
  :type 'string)

(defcustom vist2-socket nil
  "The daemon's socket, or nil for vist2ctl's default.
The default is $XDG_RUNTIME_DIR/vist2/vist2.sock."
  :type '(choice (const :tag "Default" nil) string))

(defcustom vist2-debounce 0.3
  "Seconds of quiet after an edit before an attached buffer is sent again."
  :type 'number)

(defcustom vist2-chat t
  "Whether asks are wrapped in the model's chat template."
  :type 'boolean)

(defcustom vist2-max-tokens 256
  "The most tokens an answer may have."
  :type 'integer)

(defcustom vist2-temperature 0.2
  "Sampling temperature of asks; 0 is greedy."
  :type 'number)

(defcustom vist2-seed 0
  "Random seed of asks."
  :type 'integer)

(defcustom vist2-full-text nil
  "Whether asks read the documents as plain text instead of compressed.
Plain text is the baseline compression is compared with."
  :type 'boolean)

(defvar vist2-request-started-hook nil
  "Run when an ask or compress starts.")

(defvar vist2-request-finished-hook nil
  "Run when an ask or compress ends (done, cancelled or failed).")

(defvar vist2-last-result nil
  "The final event of the last ask or compress, as an alist.")

(defvar vist2--process nil)
(defvar vist2--partial "")
(defvar vist2--pending (make-hash-table :test 'eql))
(defvar vist2--next-id 0)
(defvar vist2--buffers nil "Attached buffers, in attach order (the context order of an ask).")
(defvar vist2--handles 0)
(defvar vist2--state 'idle "One of idle, compressing, generating, cancelled, error.")
(defvar vist2--percent 0)
(defvar vist2--daemon-up nil)
(defvar vist2--current nil "The id of the running ask or compress.")

(defvar-local vist2--handle nil)
(defvar-local vist2--timer nil)
(defvar-local vist2--dirty nil)
(defvar-local vist2--opened nil)

;;;; The bridge process

(defun vist2--running-p ()
  "Whether the bridge process runs."
  (and vist2--process (process-live-p vist2--process)))

(defun vist2--start ()
  "Start `vist2ctl bridge' unless it runs, and open the attached buffers on it."
  (unless (vist2--running-p)
    (setq vist2--partial "")
    (let ((args (list "bridge" "--client-name" "emacs-vist2")))
      (when vist2-socket
        (setq args (append args (list "--socket" vist2-socket))))
      (setq vist2--process
            (make-process :name "vist2-bridge"
                          :command (cons vist2-command args)
                          :connection-type 'pipe
                          :noquery t
                          :coding 'utf-8-unix
                          :stderr (get-buffer-create " *vist2-bridge-stderr*")
                          :filter #'vist2--filter
                          :sentinel #'vist2--sentinel)))
    (dolist (buf vist2--buffers)
      (when (buffer-live-p buf)
        (with-current-buffer buf
          (setq vist2--opened nil)
          (vist2--open buf))))))

(defun vist2--filter (_process output)
  "Split OUTPUT into lines and dispatch each as an event."
  (let ((text (concat vist2--partial output))
        (start 0))
    (while (string-match "\n" text start)
      (let ((line (substring text start (match-beginning 0))))
        (setq start (match-end 0))
        (vist2--dispatch line)))
    (setq vist2--partial (substring text start))))

(defun vist2--dispatch (line)
  "Handle one event LINE from the bridge."
  (let ((event (condition-case nil
                   (json-parse-string line :object-type 'alist :null-object nil :false-object nil)
                 (error nil))))
    (when event
      (let ((id (alist-get 'id event))
            (kind (alist-get 'event event)))
        (cond
         ((null id)
          (pcase kind
            ("daemon_up" (setq vist2--daemon-up t))
            ("daemon_down" (setq vist2--daemon-up nil))
            ("document_lost"
             (message "vist2: the daemon refused a document when it came back: %s"
                      (alist-get 'message (alist-get 'error event))))))
         (t
          (let ((handler (gethash id vist2--pending)))
            (when (alist-get 'final event)
              (remhash id vist2--pending))
            (when handler
              (funcall handler event)))))))))

(defun vist2--sentinel (process _change)
  "Fail what PROCESS had in flight when it ends."
  (unless (process-live-p process)
    (setq vist2--daemon-up nil)
    (let ((handlers nil))
      (maphash (lambda (id h) (push (cons id h) handlers)) vist2--pending)
      (clrhash vist2--pending)
      (dolist (buf vist2--buffers)
        (when (buffer-live-p buf)
          (with-current-buffer buf (setq vist2--opened nil))))
      (dolist (h handlers)
        (funcall (cdr h) `((id . ,(car h)) (event . "error") (final . t)
                           (error (code . "bridge_exited")
                                  (message . "vist2ctl bridge exited"))))))))

(defun vist2--request (request handler)
  "Send REQUEST (an alist without id) and call HANDLER with each of its events.
Returns the request's id."
  (vist2--start)
  (setq vist2--next-id (1+ vist2--next-id))
  (let ((id vist2--next-id))
    (puthash id (or handler #'ignore) vist2--pending)
    (process-send-string vist2--process
                         (concat (json-serialize (cons (cons 'id id) request)) "\n"))
    id))

(defun vist2--error-text (event)
  "The message and code of an error EVENT."
  (let ((e (alist-get 'error event)))
    (format "%s [%s]" (alist-get 'message e) (alist-get 'code e))))

;;;; Documents

(defun vist2--text (buf)
  "The whole text of BUF."
  (with-current-buffer buf
    (save-restriction
      (widen)
      (buffer-substring-no-properties (point-min) (point-max)))))

(defun vist2--open (buf)
  "Open BUF as a document on the bridge."
  (with-current-buffer buf
    (setq vist2--opened t
          vist2--dirty nil)
    (vist2--request `((op . "open") (document . ,vist2--handle) (text . ,(vist2--text buf))
                      (path . ,(or (buffer-file-name buf) (buffer-name buf))))
                    (lambda (event)
                      (when (equal (alist-get 'event event) "error")
                        (message "vist2: cannot attach %s: %s" (buffer-name buf) (vist2--error-text event))
                        ;; Not a document: leave the mode rather than ask with a handle the
                        ;; bridge does not know.
                        (when (buffer-live-p buf)
                          (with-current-buffer buf (vist2-mode -1))))))))

(defun vist2--send-update (buf)
  "Send the text of BUF if it changed since it was last sent."
  (when (and (buffer-live-p buf) (buffer-local-value 'vist2-mode buf))
    (with-current-buffer buf
      (when vist2--dirty
        (setq vist2--dirty nil)
        (if (not (and vist2--opened (vist2--running-p)))
            (vist2--start)
          (vist2--request `((op . "update") (document . ,vist2--handle) (text . ,(vist2--text buf)))
                          (lambda (event)
                            (when (equal (alist-get 'event event) "error")
                              (message "vist2: update failed: %s" (vist2--error-text event))))))))))

(defun vist2--after-change (&rest _)
  "Schedule an update of this buffer after `vist2-debounce' seconds of quiet."
  (setq vist2--dirty t)
  (when (timerp vist2--timer)
    (cancel-timer vist2--timer))
  (setq vist2--timer (run-with-timer vist2-debounce nil #'vist2--send-update (current-buffer))))

(defun vist2--flush ()
  "Send every attached buffer edited since its last update."
  (dolist (buf vist2--buffers)
    (when (buffer-live-p buf)
      (with-current-buffer buf
        (when (timerp vist2--timer)
          (cancel-timer vist2--timer))
        (vist2--send-update buf)))))

(defun vist2--detach ()
  "Close this buffer's document."
  (when (timerp vist2--timer)
    (cancel-timer vist2--timer))
  (setq vist2--buffers (delq (current-buffer) vist2--buffers))
  (remove-hook 'after-change-functions #'vist2--after-change t)
  (remove-hook 'kill-buffer-hook #'vist2--detach t)
  (when (and vist2--handle (vist2--running-p))
    (vist2--request `((op . "close") (document . ,vist2--handle)) nil))
  (setq vist2--handle nil
        vist2--opened nil))

;;;###autoload
(define-minor-mode vist2-mode
  "Keep this buffer as a document in the vist2 daemon.
Edits are sent after `vist2-debounce' seconds of quiet; `vist2-ask' reads every
buffer in this mode."
  :lighter (:eval (concat " vist2" (if (eq vist2--state 'idle) "" (concat ":" (vist2-status-string)))))
  (if vist2-mode
      (progn
        (setq vist2--handles (1+ vist2--handles)
              vist2--handle (format "emacs-%d" vist2--handles))
        (setq vist2--buffers (append vist2--buffers (list (current-buffer))))
        (add-hook 'after-change-functions #'vist2--after-change nil t)
        (add-hook 'kill-buffer-hook #'vist2--detach nil t)
        (if (vist2--running-p)
            (vist2--open (current-buffer))
          (vist2--start)))
    (vist2--detach)))

;;;; Asking

(defvar vist2-answer-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-g") #'vist2-answer-interrupt)
    (define-key map (kbd "q") #'vist2-answer-quit)
    map)
  "Keys of the *vist2* buffer.")

(define-derived-mode vist2-answer-mode special-mode "vist2-answer"
  "The *vist2* buffer, where answers stream.  C-g or q stops a running answer.")

(defun vist2-answer-interrupt ()
  "Stop the running answer; without one, what C-g does anyway."
  (interactive)
  (unless (vist2-cancel)
    (keyboard-quit)))

(defun vist2-answer-quit ()
  "Stop the running answer, or quit the window when none runs."
  (interactive)
  (unless (vist2-cancel)
    (quit-window)))

(defun vist2--begin (state)
  "Mark a request of STATE as running."
  (setq vist2--state state
        vist2--percent 0)
  (run-hooks 'vist2-request-started-hook)
  (force-mode-line-update t))

(defun vist2--end (state event)
  "Mark the running request as ended in STATE with its final EVENT."
  (setq vist2--state state
        vist2--current nil
        vist2-last-result event)
  (run-hooks 'vist2-request-finished-hook)
  (force-mode-line-update t))

(defun vist2-answer ()
  "The text of the last answer, as it stands."
  (let ((buf (get-buffer "*vist2*")))
    (when buf
      (with-current-buffer buf
        (save-excursion
          (goto-char (point-min))
          (forward-line 2)
          (buffer-substring-no-properties (point) (point-max)))))))

;;;###autoload
(defun vist2-ask (prompt &optional selection)
  "Ask PROMPT about the attached buffers; the answer streams into *vist2*.
Interactively, an active region is SELECTION, added to the prompt."
  (interactive
   (list (read-string "Ask vist2: ")
         (when (use-region-p)
           (buffer-substring-no-properties (region-beginning) (region-end)))))
  (if vist2--current
      (progn (message "vist2: a request is running; M-x vist2-cancel stops it") nil)
    (vist2--flush)
    (let* ((full (if (and selection (not (string-empty-p selection)))
                     (concat prompt "\n\n" selection)
                   prompt))
           (out (get-buffer-create "*vist2*"))
           (handles (delq nil (mapcar (lambda (b) (and (buffer-live-p b) (buffer-local-value 'vist2--handle b)))
                                      vist2--buffers)))
           (request `((op . "generate") (prompt . ,full)
                      (chat . ,(if vist2-chat t :false))
                      (max_tokens . ,vist2-max-tokens)
                      (temperature . ,vist2-temperature)
                      (seed . ,vist2-seed)
                      (full_text . ,(if vist2-full-text t :false)))))
      (when handles
        (setq request (append request `((documents . ,(vconcat handles))))))
      (with-current-buffer out
        (vist2-answer-mode)
        (let ((inhibit-read-only t))
          (erase-buffer)
          (insert "vist2> " (car (split-string full "\n")) "\n\n")))
      (display-buffer out)
      (vist2--begin 'generating)
      (setq vist2--current
            (vist2--request
             request
             (lambda (event)
               (pcase (alist-get 'event event)
                 ("delta"
                  (when (buffer-live-p out)
                    (with-current-buffer out
                      (let ((inhibit-read-only t)
                            (at-end (= (point) (point-max))))
                        (save-excursion
                          (goto-char (point-max))
                          (insert (alist-get 'text event)))
                        (when at-end (goto-char (point-max)))))))
                 ("done"
                  (vist2--end 'idle event)
                  (message "vist2: %d tokens, %.0f ms to first token%s"
                           (alist-get 'generated_tokens event) (or (alist-get 'ttft_ms event) 0)
                           (if (alist-get 'compression_ratio event)
                               (format ", documents compressed %.1fx" (alist-get 'compression_ratio event))
                             "")))
                 ("error"
                  (if (equal (alist-get 'code (alist-get 'error event)) "cancelled")
                      (progn (vist2--end 'cancelled event) (message "vist2: cancelled"))
                    (vist2--end 'error event)
                    (message "vist2: %s" (vist2--error-text event))))))))
      vist2--current)))

;;;###autoload
(defun vist2-compress (&optional instruction)
  "Compress this buffer in the daemon (attaching it), for INSTRUCTION."
  (interactive)
  (if vist2--current
      (progn (message "vist2: a request is running; M-x vist2-cancel stops it") nil)
    (unless vist2-mode (vist2-mode 1))
    (vist2--flush)
    (vist2--begin 'compressing)
    (setq vist2--current
          (vist2--request
           `((op . "compress") (document . ,vist2--handle) (instruction . ,(or instruction ""))
             (chat . ,(if vist2-chat t :false)))
           (lambda (event)
             (pcase (alist-get 'event event)
               ("progress"
                (let ((done (alist-get 'chunks_done event))
                      (total (alist-get 'chunks_total event)))
                  (setq vist2--percent (if (> total 0) (/ (* 100 done) total) 100))
                  (message "vist2: compressing %d/%d chunks (%d%%)" done total vist2--percent)
                  (force-mode-line-update t)))
               ("compressed"
                (vist2--end 'idle event)
                (message "vist2: %d chunks, %d tokens -> %d visual tokens (%.1fx); encoded %d, from cache %d"
                         (alist-get 'chunks event) (alist-get 'text_tokens event) (alist-get 'visual_tokens event)
                         (alist-get 'ratio event) (alist-get 'chunks_encoded event)
                         (+ (alist-get 'chunk_cache_hits event) (alist-get 'prefix_cache_hits event))))
               ("error"
                (vist2--end (if (equal (alist-get 'code (alist-get 'error event)) "cancelled") 'cancelled 'error) event)
                (message "vist2: %s" (vist2--error-text event)))))))
    vist2--current))

;;;###autoload
(defun vist2-cancel ()
  "Stop the running ask or compress.  Returns non-nil when there was one."
  (interactive)
  (when (and vist2--current (vist2--running-p))
    (vist2--request `((op . "cancel") (target . ,vist2--current)) nil)
    t))

(defun vist2-status-string ()
  "The state, for mode lines.
One of idle, compressing N%, generating, cancelled, error, daemon down."
  (pcase vist2--state
    ('compressing (format "compressing %d%%" vist2--percent))
    ('generating "generating")
    (_ (if (and (vist2--running-p) (not vist2--daemon-up)) "daemon down" (symbol-name vist2--state)))))

;;;###autoload
(defun vist2-status ()
  "Show the daemon's state."
  (interactive)
  (vist2--request '((op . "status"))
                  (lambda (event)
                    (if (equal (alist-get 'event event) "status")
                        (message "vist2: %s, model %s (%s, protocol %d); %d attached here, %d documents open in the daemon, queue %d"
                                 (alist-get 'state event) (alist-get 'model event) (alist-get 'server_version event)
                                 (alist-get 'protocol_version event) (length vist2--buffers)
                                 (alist-get 'documents_open event) (alist-get 'queue_length event))
                      (message "vist2: %s" (vist2--error-text event))))))

(provide 'vist2)
;;; vist2.el ends here
