-- tokenlife's cli_filter: at sbatch and salloc time, warn when the job's time
-- limit outlives the submitter's token (its renew-until), so that the user can
-- log in again (a new login starts a new token chain) or shorten the job.
--
-- Install on login nodes (and wherever users submit):
--   slurm.conf:  CliFilterPlugins=cli_filter/lua
--   this file:   cli_filter.lua in the directory of slurm.conf
-- Slurm's clients load it as the submitting user; it runs
-- "tokenlife-engine check --quiet --time-limit T" (docs/engine.md).
--
-- To refuse such jobs instead of warning, set REFUSE to true: sbatch and
-- salloc then fail with "cli_filter plugin terminated with error".

local ENGINE = "/usr/local/bin/tokenlife-engine"
local REFUSE = false
-- Slurm's "no --time given" (NO_VAL minutes): the partition's limit applies,
-- which the client does not know, so nothing is checked.
local UNSET_PREFIX = "2982616-"

function slurm_cli_setup_defaults(options, early_pass)
	return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, jobid, stepid)
	return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, offset)
	local kind = options["type"]
	if kind ~= "sbatch" and kind ~= "salloc" then
		return slurm.SUCCESS -- srun starts steps of jobs that were checked already
	end
	local limit = options["time"]
	if limit == nil or string.sub(limit, 1, #UNSET_PREFIX) == UNSET_PREFIX then
		return slurm.SUCCESS
	end
	-- Slurm formats it ("1-02:03:00", "UNLIMITED"): anything else is not passed on.
	if not (string.match(limit, "^[%d:%-]+$") or limit == "UNLIMITED") then
		return slurm.SUCCESS
	end
	-- Lua 5.1 (Debian 12's Slurm) gives no exit status on close: the shell says it.
	local command = ENGINE .. " check --quiet --time-limit " .. limit
	local pipe = io.popen(command .. ' 2>&1; echo "tokenlife-status $?"')
	if pipe == nil then
		return slurm.SUCCESS
	end
	local out = pipe:read("*a") or ""
	pipe:close()
	local status = tonumber(string.match(out, "tokenlife%-status (%d+)%s*$"))
	local said = string.match(out, "^tokenlife%-engine: ([^\n]*)")
	-- 1: no valid token; 3: it will not last; others (2: a configuration
	-- problem, 127: no tokenlife here) are the administrator's, not the job's.
	if (status == 1 or status == 3) and said ~= nil then
		if REFUSE then
			slurm.log_error("tokenlife: %s", said)
			return slurm.ERROR
		end
		slurm.log_info("tokenlife: warning: %s", said)
	end
	return slurm.SUCCESS
end
