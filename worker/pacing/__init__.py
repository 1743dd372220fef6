"""The rate budget: when the next request may go.

budget         the Pacer protocol the runner needs, and the constants every pacer keeps
local          one process's even pacing (LocalPacer)
shared         one budget for many processes on one account, booked in Redis (RedisPacer)
redis_scripts  the shared budget's key names and Lua scripts
redis_clock    Redis's clock read in local time (Mark, best_mark)
"""
