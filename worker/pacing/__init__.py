"""The rate budget: when the next request may go.

local    one process's even pacing (LocalPacer) and the Pacer protocol both pacers meet
shared   one budget for many processes on one account, booked in Redis (RedisPacer)
"""
